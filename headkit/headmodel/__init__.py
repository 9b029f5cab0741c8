"""Linear head models (neutral mesh + expression and identity modes) and their loaders.

``load_ict_face_model`` reads the ICT Face Model Light (ICT-FaceKit, MIT) from its own
``FaceXModel`` folder; ``resolve_ict_kit`` finds or downloads that folder.
"""

from headkit.headmodel.ict import (DEFAULT_REGIONS, ICT_COMMIT, ICT_REGIONS, ICT_REPOSITORY,
                                   load_ict_face_model, resolve_ict_kit)
from headkit.headmodel.model import HeadModel, HeadModelError

__all__ = ["DEFAULT_REGIONS", "ICT_COMMIT", "ICT_REGIONS", "ICT_REPOSITORY", "HeadModel",
           "HeadModelError", "load_ict_face_model", "resolve_ict_kit"]
