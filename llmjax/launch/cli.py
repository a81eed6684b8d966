"""`llmjax launch tpu-vm | gke | slurm CONFIG [overrides] ... [--dry-run]` (wired into
llmjax/cli.py). Each checks the config and the target before anything is created; --dry-run
prints what would run (gcloud commands, the JobSet YAML, the sbatch script) and runs nothing.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from llmjax.errors import ConfigError
from llmjax.launch.job import DEFAULT_COORDINATOR_PORT


def _count(what: str, minimum: int = 1):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be a whole number >= {minimum}, "
                                             f"got {text!r}")
        return value
    return parse


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    launch = subparsers.add_parser(
        "launch", help="run training on Cloud TPU VMs, GKE (JobSet) or SLURM, relaunching after "
                       "preemption (docs/pods.md)")
    engines = launch.add_subparsers(dest="launch_engine", required=True, metavar="ENGINE")

    def engine(name: str, help_text: str, handler):
        p = engines.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="YAML config (configs/experiments/...)")
        p.add_argument("overrides", nargs="*", default=[], metavar="section.key=value",
                       help="overrides, passed on to `llmjax train` on every host")
        p.add_argument("--bucket", default=None, metavar="gs://BUCKET/RUN",
                       help="the run directory (train.run_dir): checkpoints, metrics, exports")
        p.add_argument("--data-dir", default=None, metavar="gs://BUCKET/DATA",
                       help="data.data_dir (prepared datasets), shared by every host")
        p.add_argument("--name", default=None, help="job / TPU name (default: the config's name)")
        p.add_argument("--max-restarts", type=_count("--max-restarts", 0), default=10,
                       help="restart budget: relaunches after exit 75 or 1 (default 10)")
        p.add_argument("--dry-run", action="store_true", help="print what would run; run nothing")
        p.set_defaults(handler=handler)
        return p

    def tpu_options(p, slices_help):
        p.add_argument("--tpu", required=True, metavar="TYPE",
                       help="Cloud TPU type: v5p-128, v5litepod-16 (v5e-16), v6e-256, v4-32")
        p.add_argument("--slices", type=_count("--slices"), default=1, help=slices_help)
        p.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")

    p = engine("tpu-vm", "create Cloud TPU VMs (or a queued resource), run on every worker, "
                         "relaunch after preemption", launch_tpu_vm)
    tpu_options(p, "slices (> 1: multislice through a queued resource)")
    p.add_argument("--zone", required=True, help="zone with the TPU type, e.g. us-east5-a")
    p.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
    p.add_argument("--queued", action="store_true",
                   help="ask through a queued resource (waits for capacity; implied by --spot "
                        "and --slices > 1)")
    p.add_argument("--runtime-version", default=None,
                   help="TPU VM software version (default: the generation's)")
    p.add_argument("--service-account", default=None, metavar="EMAIL",
                   help="GCP service account of the TPU VMs (one that may use the bucket)")
    p.add_argument("--existing", action="store_true",
                   help="the slice exists and is set up: start the run only")
    p.add_argument("--poll-seconds", type=float, default=60.0,
                   help="how often the workers' exit codes are checked")

    p = engine("gke", "a JobSet manifest (YAML) for TPU slices on GKE, applied with kubectl",
               launch_gke)
    tpu_options(p, "slices (replicated Jobs of the JobSet; multislice over DCN)")
    p.add_argument("--image", required=True, help="container image with this checkout installed")
    p.add_argument("--coordinator-port", type=_count("--coordinator-port"),
                   default=DEFAULT_COORDINATOR_PORT, help="jax.distributed coordinator port")
    p.add_argument("--service-account", default=None,
                   help="Kubernetes service account bound to a GCP one that may use the bucket")
    p.add_argument("--grace-seconds", type=_count("--grace-seconds"), default=300,
                   help="terminationGracePeriodSeconds: time to checkpoint after SIGTERM")
    p.add_argument("--cluster", default="CLUSTER",
                   help="GKE cluster name (in the node pool and xpk commands shown)")

    p = engine("slurm", "an sbatch script for GPU clusters (jax.distributed from SLURM's "
                        "variables, requeue after preemption)", launch_slurm)
    p.add_argument("--nodes", type=_count("--nodes"), required=True, help="nodes (one task each)")
    p.add_argument("--gpus-per-node", type=_count("--gpus-per-node"), default=8)
    p.add_argument("--time", default="24:00:00", help="time limit per allocation")
    p.add_argument("--partition", default=None)
    p.add_argument("--python", default="python3",
                   help="python on the nodes (e.g. .venv/bin/python)")
    p.add_argument("--coordinator-port", type=_count("--coordinator-port"),
                   default=DEFAULT_COORDINATOR_PORT, help="jax.distributed coordinator port")


def _tpu(args):
    from llmjax.launch.topology import lookup
    return lookup(args.tpu)


def _job(args, remote: str | None, python: str = "python3"):
    from llmjax.launch.job import train_job
    return train_job(args.config, args.overrides, bucket=args.bucket, data_dir=args.data_dir,
                     name=args.name, remote=remote, python=python)


def _warn(notes) -> None:
    for note in notes:
        print(f"llmjax: note: {note}", file=sys.stderr)


def launch_tpu_vm(args) -> int:
    from llmjax.launch import tpu_vm
    tpu = _tpu(args)
    hosts = tpu.hosts * args.slices
    remote = None
    if hosts > 1 or args.spot or args.queued:
        remote = (f"a {tpu.accelerator_type} x {args.slices} launch runs on {hosts} TPU VMs "
                  f"whose local disks vanish with the VMs" if hosts > 1 else
                  "a spot TPU VM's local disk vanishes when it is preempted")
    job = _job(args, remote)
    s = tpu_vm.Slice(tpu, job.name, args.zone, args.project, args.slices, args.spot,
                     args.queued, args.runtime_version, args.service_account)
    run = tpu_vm.Runner(args.dry_run)
    if args.dry_run:
        return tpu_vm.supervise(job, s, archive="/tmp/llmjax.tar.gz",
                                max_restarts=args.max_restarts, run=run,
                                create=not args.existing)
    _need("gcloud", "the Google Cloud CLI (https://cloud.google.com/sdk)")
    _warn(job.notes)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _pack_checkout(Path(tmp) / "llmjax.tar.gz")
        return tpu_vm.supervise(job, s, archive=str(archive), max_restarts=args.max_restarts,
                                run=run, poll_seconds=args.poll_seconds,
                                create=not args.existing)


def launch_gke(args) -> int:
    from llmjax.launch import gke
    tpu = _tpu(args)
    job = _job(args, "GKE pods keep nothing on local disk once they are rescheduled")
    manifest = gke.jobset(job, tpu, slices=args.slices, image=args.image,
                          max_restarts=args.max_restarts, spot=args.spot,
                          service_account=args.service_account,
                          coordinator_port=args.coordinator_port,
                          grace_seconds=args.grace_seconds)
    xpk = gke.xpk_command(job, tpu, slices=args.slices, image=args.image,
                          max_restarts=args.max_restarts, cluster=args.cluster)
    pool = gke.node_pool_command(tpu, pool=f"{job.name}-0", cluster=args.cluster,
                                 spot=args.spot)
    text = gke.render(manifest, xpk, job.notes, pool)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    _need("kubectl", "kubectl with credentials for the cluster "
                     "(gcloud container clusters get-credentials CLUSTER)")
    _warn(job.notes)
    return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True).returncode


def launch_slurm(args) -> int:
    from llmjax.launch import slurm
    job = _job(args, None, python=args.python)
    script = slurm.sbatch_script(job, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                 max_restarts=args.max_restarts, time_limit=args.time,
                                 partition=args.partition,
                                 coordinator_port=args.coordinator_port)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    _need("sbatch", "SLURM's sbatch (run this on the cluster's login node)")
    return subprocess.run(["sbatch"], input=script, text=True).returncode


def _need(program: str, what: str) -> None:
    if shutil.which(program) is None:
        raise ConfigError(f"{program} is not on PATH: install {what}, or add --dry-run to print "
                          f"what would run")


def _pack_checkout(out: Path) -> Path:
    """The files git tracks, plus tokenizers/ (trained locally, not in git), as a tar.gz."""
    root = Path(__file__).resolve().parents[2]
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                            text=True)
    if listed.returncode:
        raise ConfigError(f"{root} is not a git checkout; tpu-vm copies the files git tracks")
    with tarfile.open(out, "w:gz") as tar:
        for name in filter(None, listed.stdout.split("\0")):
            if (root / name).is_file():
                tar.add(root / name, arcname=name)
        if (root / "tokenizers").is_dir():
            tar.add(root / "tokenizers", arcname="tokenizers")
    return out
