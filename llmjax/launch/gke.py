"""A JobSet manifest (and the equivalent xpk command) for TPU slices on GKE.

One replicated Job per slice (`--slices`), one pod per TPU VM host, every pod running the same
`llmjax train`. Restarts follow the exit-code contract (llmjax/launch/job.py):

- the Job's podFailurePolicy fails the Job at once when the container exits 2 (user error;
  reason PodFailurePolicy), and the JobSet's failurePolicy rule turns that into a failed JobSet:
  no restart;
- any other failure (75 preempted, 1 internal or a peer lost, a pod killed with its node) fails
  the Job (backoffLimit 0: one lost host stops the slice), and the JobSet recreates every Job:
  `RestartJobSet`, counted against `failurePolicy.maxRestarts` (the restart budget). The new
  pods resume from the latest committed checkpoint in the bucket.

jax.distributed is wired explicitly, not left to auto-detection: JAX_COORDINATOR_ADDRESS names
pod 0 of slice 0 through the headless service JobSet creates (named after the JobSet), on a port
of our choosing (firewalls open one port; jax's TPU default changed between releases);
JAX_NUM_PROCESSES is hosts x slices; JAX_PROCESS_ID = slice index x hosts + pod index, from the
annotations JobSet and the Job controller put on every pod. The TPU runtime's own variables
(TPU_WORKER_ID, TPU_WORKER_HOSTNAMES, and MEGASCALE_* across slices) are injected by GKE's TPU
webhook, as xpk relies on.
"""
from __future__ import annotations

import shlex
from typing import Any

import yaml

from llmjax.launch.job import DEFAULT_COORDINATOR_PORT, EXIT_USER_ERROR, TrainJob
from llmjax.launch.topology import TpuSlice

CONTAINER = "llmjax"
REPLICATED_JOB = "slice"
# Ports the TPU runtime uses between hosts (ICI set-up) and between slices (DCN, megascale).
TPU_RUNTIME_PORTS = (8471, 8080)


def _field_env(name: str, annotation: str) -> dict:
    return {"name": name, "valueFrom": {"fieldRef": {
        "fieldPath": f"metadata.annotations['{annotation}']"}}}


def container_script(job: TrainJob, hosts: int) -> str:
    """The container's command: its global process id from the pod's indices, then exec the
    trainer (exec: SIGTERM reaches python, whose exit code is the container's)."""
    return ("set -eu\n"
            f"export JAX_PROCESS_ID=$((SLICE_INDEX * {hosts} + HOST_INDEX))\n"
            f"exec {job.shell()}\n")


def jobset(job: TrainJob, tpu: TpuSlice, *, slices: int, image: str, max_restarts: int,
           spot: bool = False, service_account: str | None = None,
           coordinator_port: int = DEFAULT_COORDINATOR_PORT,
           grace_seconds: int = 300) -> dict[str, Any]:
    """The JobSet as a dict (yaml.safe_dump it for kubectl apply)."""
    processes = tpu.hosts * slices
    coordinator = f"{job.name}-{REPLICATED_JOB}-0-0.{job.name}:{coordinator_port}"
    env = [
        _field_env("SLICE_INDEX", "jobset.sigs.k8s.io/job-index"),
        _field_env("HOST_INDEX", "batch.kubernetes.io/job-completion-index"),
        {"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
        {"name": "JAX_NUM_PROCESSES", "value": str(processes)},
    ]
    node_selector = {"cloud.google.com/gke-tpu-accelerator": tpu.gke_accelerator,
                     "cloud.google.com/gke-tpu-topology": tpu.topology}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the Job and the JobSet restart, never the kubelet
        "nodeSelector": node_selector,
        # DCN traffic between slices goes through the host's network (as xpk sets it).
        "hostNetwork": True,
        "dnsPolicy": "ClusterFirstWithHostNet",
        # Time for every host to checkpoint the same step after SIGTERM.
        "terminationGracePeriodSeconds": grace_seconds,
        "containers": [{
            "name": CONTAINER,
            "image": image,
            "command": ["bash", "-c", container_script(job, tpu.hosts)],
            "env": env,
            "ports": [{"containerPort": p} for p in (*TPU_RUNTIME_PORTS, coordinator_port)],
            "resources": {"requests": {"google.com/tpu": str(tpu.chips_per_host)},
                          "limits": {"google.com/tpu": str(tpu.chips_per_host)}},
            # Data-loader workers share batches through /dev/shm; the default 64 MiB is too small.
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        pod_spec["tolerations"] = [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                    "value": "true", "effect": "NoSchedule"}]
    if service_account:  # Workload Identity: the Kubernetes service account that may use the bucket
        pod_spec["serviceAccountName"] = service_account
    labels = {"app.kubernetes.io/name": "llmjax", "llmjax/run": job.name}
    return {
        "apiVersion": "jobset.x-k8s.io/v1alpha2",
        "kind": "JobSet",
        "metadata": {"name": job.name, "labels": labels, "annotations": {
            # One slice per node pool: a slice's hosts share one ICI domain.
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}},
        "spec": {
            "failurePolicy": {
                "maxRestarts": max_restarts,
                "rules": [{"name": "userErrorFailsJobSet", "action": "FailJobSet",
                           "onJobFailureReasons": ["PodFailurePolicy"]}],
            },
            # The headless service <name> that gives pod 0 of slice 0 its DNS name.
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": slices,
                "template": {"spec": {
                    "parallelism": tpu.hosts,
                    "completions": tpu.hosts,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,  # one failed host fails the slice: jax cannot lose a peer
                    "podFailurePolicy": {"rules": [{
                        "action": "FailJob",
                        "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                                        "values": [EXIT_USER_ERROR]}}]},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                }},
            }],
        },
    }


def xpk_command(job: TrainJob, tpu: TpuSlice, *, slices: int, image: str, max_restarts: int,
                cluster: str) -> list[str]:
    """The same workload through xpk (which writes a JobSet of its own; it relies on jax's GKE
    auto-detection for the process ids). xpk restarts on exit codes 42 and 127-255 by default;
    1 and 75 are added, so that, as above, only a user error (2) fails the workload."""
    return ["xpk", "workload", "create", "--cluster", cluster, "--workload", job.name,
            "--tpu-type", tpu.accelerator_type, "--num-slices", str(slices),
            "--docker-image", image, "--max-restarts", str(max_restarts),
            "--restart-on-exit-codes", "1,75", "--command", job.shell()]


class _Dumper(yaml.SafeDumper):
    """Plain YAML for people and kubectl: no anchors, multi-line strings as `|` blocks."""

    def ignore_aliases(self, data):
        return True


_Dumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style="|" if "\n" in value else None))


def node_pool_command(tpu: TpuSlice, *, pool: str, cluster: str, spot: bool) -> list[str]:
    """The GKE node pool one slice needs (one pool per slice: --slices N needs N pools)."""
    return (["gcloud", "container", "node-pools", "create", pool, "--cluster", cluster,
             "--machine-type", tpu.gke_machine_type, "--tpu-topology", tpu.topology,
             "--num-nodes", str(tpu.hosts)] + (["--spot"] if spot else []))


def render(manifest: dict, xpk: list[str], notes: tuple[str, ...] = (),
           node_pool: list[str] | None = None) -> str:
    """The manifest as YAML, headed by comments: how to apply it, the node pool each slice
    needs, the xpk equivalent, notes."""
    head = ["# llmjax launch gke: apply with `kubectl apply -f FILE` (JobSet controller needed)"]
    if node_pool:
        head += ["# each slice needs a node pool of its own, e.g.:",
                 "#   " + " ".join(shlex.quote(a) for a in node_pool)]
    head += ["# the same workload through xpk:",
             "#   " + " ".join(shlex.quote(a) for a in xpk)]
    head += [f"# note: {n}" for n in notes]
    return "\n".join(head) + "\n" + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)
