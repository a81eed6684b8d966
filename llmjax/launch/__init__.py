"""Launching training on existing engines: Cloud TPU VMs (and queued resources), GKE (JobSet),
SLURM. `topology` is a plain table of Cloud TPU slice types, shared with planners."""
