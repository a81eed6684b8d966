"""An sbatch script for GPU clusters: one task per node, jax.distributed wired from SLURM's
variables, and a requeue after preemption within a restart budget.

- coordinator: the first node of SLURM_JOB_NODELIST (`scontrol show hostnames`), on a fixed
  port; JAX_NUM_PROCESSES = SLURM_NTASKS and JAX_PROCESS_ID = SLURM_PROCID, set inside each
  task (each has its own SLURM_PROCID);
- `--signal=TERM@SECONDS`: SLURM sends SIGTERM that long before the time limit; llmjax
  checkpoints on every host at the same step and exits 75;
- exit 75 or 1 (preempted; internal or a peer lost): `scontrol requeue` puts the same job back
  in the queue (SLURM_RESTART_COUNT counts the requeues: the budget), and the requeued job
  resumes from the latest checkpoint in the run directory. 0 and 2 end the job.
The run directory must be on storage every node sees (a shared filesystem, or gs://).
"""
from __future__ import annotations

import shlex

from llmjax.launch.job import DEFAULT_COORDINATOR_PORT, EXIT_INTERNAL, EXIT_PREEMPTED, TrainJob


def sbatch_script(job: TrainJob, *, nodes: int, gpus_per_node: int, max_restarts: int,
                  time_limit: str = "24:00:00", partition: str | None = None,
                  signal_seconds: int = 300,
                  coordinator_port: int = DEFAULT_COORDINATOR_PORT) -> str:
    """The batch script (submit with `sbatch FILE`)."""
    directives = [f"--job-name={job.name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={gpus_per_node}", f"--time={time_limit}",
                  f"--signal=TERM@{signal_seconds}", "--requeue", "--open-mode=append",
                  f"--output={job.name}-%j.log"]
    if partition:
        directives.append(f"--partition={partition}")
    train = " ".join(shlex.quote(a) for a in job.argv())
    lines = ["#!/usr/bin/env bash",
             "# llmjax launch slurm: submit with `sbatch FILE`",
             *(f"#SBATCH {d}" for d in directives),
             "set -u",
             "# jax.distributed: the first node of the allocation hosts the coordinator.",
             'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             f'export JAX_COORDINATOR_ADDRESS="$head:{coordinator_port}"',
             "# One task per node; each sets its own process id. --kill-on-bad-exit: a lost node "
             "stops them all.",
             "srun --kill-on-bad-exit=1 bash -c "
             "'export JAX_NUM_PROCESSES=$SLURM_NTASKS JAX_PROCESS_ID=$SLURM_PROCID; "
             "exec \"$@\"' llmjax-task " + train,
             "code=$?",
             f"# {EXIT_PREEMPTED}: preempted (checkpointed); {EXIT_INTERNAL}: internal or a peer "
             f"lost. Both resume from the last checkpoint.",
             f'if {{ [ "$code" -eq {EXIT_PREEMPTED} ] || [ "$code" -eq {EXIT_INTERNAL} ]; }} && '
             f'[ "${{SLURM_RESTART_COUNT:-0}}" -lt {max_restarts} ]; then',
             '  echo "llmjax: exit code $code; requeue $((${SLURM_RESTART_COUNT:-0} + 1)) '
             f'of {max_restarts}"',
             '  scontrol requeue "$SLURM_JOB_ID"',
             "fi",
             'exit "$code"']
    return "\n".join(lines) + "\n"
