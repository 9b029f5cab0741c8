"""headkit: what GraphAvatar and the neural-cache model share (cameras, meshes, renderers, data,
metrics, image losses and the run engine)."""

# OpenMP's wait policy is left to the user (libgomp's default: threads spin briefly between
# operations). Until 2026-12-01 headkit set OMP_WAIT_POLICY=PASSIVE here; on a quiet 2-core
# machine that made training 1.7x slower (a thread wake-up per small operation), and on a busy
# one the trainer now uses fewer threads instead (trainer.num_threads=auto,
# headkit/engine/threads.py). Measurements: benchmarks/train_step.md.
