"""One-command preprocessing of a monocular video into a subject folder.

``python scripts/prepare_data.py source=video video=PATH out=DIR`` runs
:func:`headkit.data.video.preprocess.preprocess_video`: MediaPipe face landmarks
(:mod:`.landmarks`, an optional extra), robust similarity alignment to MediaPipe's canonical
face and 3D lifting (:mod:`.align`), temporal smoothing (:mod:`.smoothing`), a square head crop
(:mod:`.crop`), expression PCA (:mod:`.expressions`) and the canonical face topology with UVs
(:mod:`.mesh_topology`). Only :mod:`.landmarks` needs MediaPipe; everything else is numpy.
"""
