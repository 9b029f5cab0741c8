"""headkit: what GraphAvatar and the neural-cache model share (cameras, meshes, renderers, data,
metrics, image losses and the run engine)."""

import os

# Idle OpenMP threads that spin (the default) stall CPU runs 5-30x on shared or oversubscribed
# machines; passive waiting costs little elsewhere. Set before torch is imported; an explicit
# user setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
