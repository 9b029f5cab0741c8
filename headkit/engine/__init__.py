"""The run engine: run folders, config and metrics files, checkpoints, logging, seeding, guards.

Everything a trainer or script needs to write a run folder that survives crashes and
restarts; method code imports from here, never the other way round.
"""

from headkit.engine.checkpoint import (CheckpointError, CheckpointManager, CorruptCheckpoint,
                                       CorruptCheckpointWarning, make_checkpoint_state,
                                       resume_or_start)
from headkit.engine.files import atomic_open, atomic_write_text, fsync_dir, to_jsonable
from headkit.engine.guards import (NonFiniteError, check_finite, check_finite_grads,
                                   device_from_string, explain_oom, oom_message)
from headkit.engine.logging import RunLogger, read_scalars, save_image
from headkit.engine.rundir import (ConfigMismatch, check_config_compatible, load_config,
                                   make_run_dir, read_metrics, save_config, write_metrics)
from headkit.progress import progress, progress_enabled
from headkit.engine.seed import capture_rng_state, restore_rng_state, seed_everything

__all__ = [
    "CheckpointError", "CheckpointManager", "CorruptCheckpoint", "CorruptCheckpointWarning",
    "make_checkpoint_state", "resume_or_start", "atomic_open", "atomic_write_text", "fsync_dir",
    "to_jsonable", "NonFiniteError", "check_finite", "check_finite_grads", "device_from_string",
    "explain_oom", "oom_message", "RunLogger", "progress", "progress_enabled", "read_scalars",
    "save_image", "ConfigMismatch", "check_config_compatible", "load_config", "make_run_dir",
    "read_metrics", "save_config", "write_metrics", "capture_rng_state", "restore_rng_state",
    "seed_everything",
]
