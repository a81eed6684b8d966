"""`llmjax launch`: the TPU slice table, the GKE JobSet (validated against Kubernetes' own models
and a JSON schema of the JobSet fields), the TPU VM relaunch loop, the sbatch script (run by
bash against stand-ins for srun/scontrol), and the one-line input errors. No cloud, no jax.
"""
from __future__ import annotations

import ast
import copy
import math
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import jsonschema
import pydantic
import pytest
import yaml
from kubernetes.client import models as k8s

from llmjax import cli
from llmjax.errors import ConfigError
from llmjax.launch import gke, slurm, tpu_vm
from llmjax.launch.job import train_job
from llmjax.launch.topology import SLICES, lookup

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/experiments/gpt-tiny.yaml")


# --------------------------------------------------------------------------------------------
# The slice table.

@pytest.mark.parametrize("name,canonical,chips,hosts,per_host,topology", [
    # Published Cloud TPU figures: v5p-N and v4-N count TensorCores (2 per chip), 4 chips/host.
    ("v5p-128", "v5p-128", 64, 16, 4, "4x4x4"),
    ("v5p-8", "v5p-8", 4, 1, 4, "2x2x1"),
    ("v4-32", "v4-32", 16, 4, 4, "2x2x4"),
    # v5e / v6e count chips; 1, 4, 8 chips are one host, larger slices 4 chips per host.
    ("v5e-16", "v5litepod-16", 16, 4, 4, "4x4"),
    ("V5LITEPOD-16", "v5litepod-16", 16, 4, 4, "4x4"),
    ("v5litepod-8", "v5litepod-8", 8, 1, 8, "2x4"),
    ("v6e-256", "v6e-256", 256, 64, 4, "16x16"),
    ("v6e-1", "v6e-1", 1, 1, 1, "1x1"),
])
def test_lookup_matches_published_sizes(name, canonical, chips, hosts, per_host, topology):
    s = lookup(name)
    assert (s.accelerator_type, s.chips, s.hosts, s.chips_per_host, s.topology) == (
        canonical, chips, hosts, per_host, topology)


def test_every_table_entry_is_consistent():
    for s in SLICES.values():
        assert math.prod(int(d) for d in s.topology.split("x")) == s.chips, s
        assert s.hosts * s.chips_per_host == s.chips, s
        assert lookup(s.accelerator_type) == s


@pytest.mark.parametrize("name,words", [
    ("v5p-100", ["v5p-8", "v5p-128", "TensorCores"]),
    ("v5e-12", ["v5litepod-16", "chips"]),
    ("v7x-8", ["v5p-128", "v5litepod-16"]),
    ("v5p128", ["did you mean 'v5p-128'"]),
])
def test_unknown_tpu_type_names_the_valid_ones(name, words):
    with pytest.raises(ConfigError) as err:
        lookup(name)
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words)


def test_topology_table_imports_no_jax():
    code = ("import sys, llmjax.launch.topology; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'llmjax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert ast.literal_eval(out.strip()) == ["llmjax", "llmjax.errors", "llmjax.launch",
                                            "llmjax.launch.topology"]


# --------------------------------------------------------------------------------------------
# GKE: the JobSet, checked against Kubernetes' models (pydantic, extra fields forbidden, strict
# types) for everything Kubernetes defines, and a JSON schema for the JobSet CRD fields used.

_RULE = {"type": "object", "additionalProperties": False, "required": ["name", "action"],
         "properties": {
             "name": {"type": "string", "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
             "action": {"enum": ["FailJobSet", "RestartJobSet",
                                 "RestartJobSetAndIgnoreMaxRestarts"]},
             "onJobFailureReasons": {"type": "array", "uniqueItems": True, "items": {
                 "enum": ["BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy",
                          "MaxFailedIndexesExceeded", "FailedIndexes"]}},
         }}
# Job fields the Kubernetes models leave as plain strings: the enums they must be.
_JOB_ENUMS = {"type": "object", "required": ["template"], "properties": {
    "completionMode": {"enum": ["Indexed", "NonIndexed"]},
    "podFailurePolicy": {"type": "object", "properties": {"rules": {"type": "array", "items": {
        "type": "object", "properties": {
            "action": {"enum": ["FailJob", "FailIndex", "Ignore", "Count"]},
            "onExitCodes": {"type": "object", "required": ["operator", "values"], "properties": {
                "operator": {"enum": ["In", "NotIn"]},
                "values": {"type": "array", "minItems": 1, "uniqueItems": True}}}}}}}},
}}
JOBSET_SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "jobset.x-k8s.io/v1alpha2"},
        "kind": {"const": "JobSet"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$",
                     "maxLength": 63}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["replicatedJobs"],
                 "properties": {
            "failurePolicy": {"type": "object", "additionalProperties": False, "properties": {
                "maxRestarts": {"type": "integer", "minimum": 0},
                "restartStrategy": {"enum": ["Recreate", "BlockingRecreate"]},
                "rules": {"type": "array", "items": _RULE}}},
            "network": {"type": "object", "additionalProperties": False, "properties": {
                "enableDNSHostnames": {"type": "boolean"},
                "subdomain": {"type": "string"},
                "publishNotReadyAddresses": {"type": "boolean"}}},
            "suspend": {"type": "boolean"},
            "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
            "replicatedJobs": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["name", "template"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z]([-a-z0-9]*[a-z0-9])?$"},
                    "replicas": {"type": "integer", "minimum": 1},
                    "template": {"type": "object", "properties": {"spec": _JOB_ENUMS}}}}},
        }},
    },
}


def check_jobset(manifest: dict) -> None:
    """Raise if the manifest is not a JobSet the API server and JobSet webhook would accept
    (for the fields llmjax writes)."""
    jsonschema.validate(manifest, JOBSET_SCHEMA)
    k8s.V1ObjectMeta.model_validate(manifest["metadata"], strict=True)
    for rj in manifest["spec"]["replicatedJobs"]:
        job = k8s.V1JobTemplateSpec.model_validate(rj["template"], strict=True)
        pod = job.spec.template.spec
        # Rules Kubernetes enforces on a Job with a podFailurePolicy.
        if job.spec.pod_failure_policy:
            assert pod.restart_policy == "Never", "podFailurePolicy needs restartPolicy Never"
            names = {c.name for c in pod.containers}
            for rule in job.spec.pod_failure_policy.rules:
                if rule.on_exit_codes and rule.on_exit_codes.container_name:
                    assert rule.on_exit_codes.container_name in names
                    assert 0 not in rule.on_exit_codes.values or rule.on_exit_codes.operator != "In"
        mounts = {m.name for c in pod.containers for m in c.volume_mounts or []}
        assert mounts <= {v.name for v in pod.volumes or []}, "a volumeMount names no volume"


def _job(**kw):
    return train_job(CONFIG, ["train.steps=10"], bucket=kw.pop("bucket", "gs://b/runs/tiny"),
                     data_dir=None, name=kw.pop("name", None), remote="GKE")


@pytest.fixture(scope="module")
def manifests():
    job = _job()
    return {(tpu, n, spot): gke.jobset(job, lookup(tpu), slices=n, image="img:1", max_restarts=7,
                                       spot=spot, service_account="trainer" if spot else None)
            for tpu, n, spot in [("v5p-128", 1, False), ("v5e-16", 2, True),
                                 ("v6e-8", 1, False)]}


def test_manifests_validate(manifests):
    for m in manifests.values():
        check_jobset(m)
        yaml_text = gke.render(m, ["xpk"])
        assert yaml.safe_load(yaml_text) == m  # the YAML round-trips


def test_manifest_restart_policy_and_paths(manifests):
    m = manifests[("v5e-16", 2, True)]
    spec = m["spec"]
    assert spec["failurePolicy"]["maxRestarts"] == 7
    assert spec["failurePolicy"]["rules"] == [{"name": "userErrorFailsJobSet",
                                               "action": "FailJobSet",
                                               "onJobFailureReasons": ["PodFailurePolicy"]}]
    rj = spec["replicatedJobs"][0]
    job = rj["template"]["spec"]
    assert (rj["replicas"], job["parallelism"], job["completions"], job["backoffLimit"]) == (
        2, 4, 4, 0)
    # Only exit code 2 (user error) fails the Job by policy; 75 and 1 fall through to a restart.
    assert job["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                   "cloud.google.com/gke-tpu-topology": "4x4",
                                   "cloud.google.com/gke-spot": "true"}
    container = pod["containers"][0]
    assert container["resources"]["limits"] == {"google.com/tpu": "4"}
    assert "train.run_dir=gs://b/runs/tiny" in container["command"][2]
    assert pod["serviceAccountName"] == "trainer"


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_container_script_gives_every_host_its_process_id(manifests, tmp_path):
    """Run each pod's command under bash, with the env Kubernetes would give it (fieldRefs
    resolved) and python3 replaced by a recorder: ids 0..N-1, one coordinator, the same N."""
    m = manifests[("v5e-16", 2, True)]
    container = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]
    _fake_bin(tmp_path, "python3", 'echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES '
                                   '$JAX_COORDINATOR_ADDRESS $*"\n')
    seen = []
    for slice_index in range(2):
        for host in range(4):
            env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
            for var in container["env"]:
                ref = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
                env[var["name"]] = var.get("value") or (
                    str(slice_index) if "job-index" in ref else str(host))
            out = subprocess.run(container["command"], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()
            seen.append(out)
    assert sorted(int(s[0]) for s in seen) == list(range(8))
    assert {s[1] for s in seen} == {"8"}
    # pod 0 of slice 0, through the JobSet's headless service (named after the JobSet)
    assert {s[2] for s in seen} == {"gpt-tiny-slice-0-0.gpt-tiny:8482"}
    assert seen[0][3:6] == ["-m", "llmjax", "train"]


@pytest.mark.parametrize("path,value,what", [
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0),
     {"imagee": "x"}, "unknown container field"),
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0,
      "env", 0), {"valueFrom": {"fieldRef": {"fieldPth": "x"}}}, "unknown env field"),
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "containers", 0,
      "resources", "limits"), {"google.com/tpu": 4}, "quantity as a number"),
    (("spec", "replicatedJobs", 0, "template", "spec", "template", "spec", "volumes", 0),
     {"emptyDir": {"medium": "Memory", "sizeLimit": "1Gi", "size": 3}}, "unknown volume field"),
    (("spec", "replicatedJobs", 0, "template", "spec"), {"backoffLimit": "0"},
     "backoffLimit as a string"),
    (("spec", "replicatedJobs", 0, "template", "spec", "podFailurePolicy", "rules", 0,
      "onExitCodes"), {"operator": "Within"}, "unknown operator"),
    (("spec", "replicatedJobs", 0), {"replicas": 0}, "no slices"),
    (("spec", "failurePolicy"), {"maxRestart": 3}, "misspelt maxRestarts"),
    (("spec", "failurePolicy", "rules", 0), {"action": "Restart"}, "unknown JobSet action"),
    (("spec",), {"replicatedJob": []}, "unknown JobSet field"),
    (("metadata",), {"name": "Bad_Name"}, "name not a DNS label"),
])
def test_broken_manifest_fails(manifests, path, value, what):
    m = copy.deepcopy(manifests[("v5p-128", 1, False)])
    node = m
    for key in path:
        node = node[key]
    node.update(value)
    with pytest.raises((pydantic.ValidationError, jsonschema.ValidationError)):
        check_jobset(m)


def test_broken_manifest_missing_container_name_fails(manifests):
    m = copy.deepcopy(manifests[("v5p-128", 1, False)])
    del m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "name"]
    with pytest.raises(pydantic.ValidationError, match="name"):
        check_jobset(m)


# --------------------------------------------------------------------------------------------
# The command line: dry runs print, bad inputs are one line and exit 2.

def test_gke_dry_run_prints_yaml(capsys):
    code = cli.main(["launch", "gke", CONFIG, "--tpu", "v5p-128", "--slices", "2", "--image",
                     "img", "--bucket", "gs://b/run", "--data-dir", "gs://b/data",
                     "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    m = yaml.safe_load(out)
    check_jobset(m)
    assert "xpk workload create" in out and "--restart-on-exit-codes 1,75" in out
    command = m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"][
        "containers"][0]["command"][2]
    assert "train.run_dir=gs://b/run" in command and "data.data_dir=gs://b/data" in command


@pytest.mark.parametrize("argv,words", [
    (["gke", "--tpu", "v5p-100", "--image", "i", "--bucket", "gs://b/r"], ["unknown TPU type"]),
    (["gke", "--tpu", "v5p-128", "--slices", "0", "--image", "i", "--bucket", "gs://b/r"],
     ["--slices must be a whole number >= 1"]),
    (["gke", "--tpu", "v5p-8", "--image", "i"], ["train.run_dir='runs/gpt-tiny'",
                                                  "local path", "gs://BUCKET"]),
    (["tpu-vm", "--tpu", "v5p-128", "--zone", "z", "--bucket", "/mnt/runs/x"],
     ["16 TPU VMs whose local disks vanish with the VMs"]),
    (["tpu-vm", "--tpu", "v5litepod-8", "--zone", "z", "--spot"], ["preempted"]),
    (["tpu-vm", "--tpu", "v5p-128", "--zone", "z", "--bucket", "gs:/b/run"],
     ["not a bucket URL"]),
    (["tpu-vm", "--tpu", "v5p-128", "--zone", "z", "--bucket", "gcs://b/run"],
     ["not a bucket URL"]),
    (["tpu-vm", "--tpu", "v5p-8", "--zone", "z", "--name", "My_Run"], ["--name"]),
    (["slurm", "--nodes", "0"], ["--nodes must be a whole number >= 1"]),
])
def test_bad_inputs_are_one_line_errors(argv, words, capsys):
    code = cli.main(["launch", argv[0], CONFIG, *argv[1:], "--dry-run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("llmjax: error:"), err
    assert all(w in err for w in words), err


def test_single_host_on_demand_tpu_vm_may_keep_a_local_run_dir(capsys):
    assert cli.main(["launch", "tpu-vm", CONFIG, "--tpu", "v5litepod-8", "--zone", "z",
                     "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tpu-vm create gpt-tiny" in out and "queued-resources" not in out


def test_tpu_vm_dry_run_spot_multislice_uses_queued_resources(capsys):
    assert cli.main(["launch", "tpu-vm", CONFIG, "--tpu", "v5e-16", "--slices", "2", "--zone",
                     "z", "--spot", "--bucket", "gs://b/r", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("gcloud compute tpus queued-resources create gpt-tiny --zone z --accelerator-type "
            "v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --node-count 2 --node-prefix "
            "gpt-tiny --spot") in out
    assert "tpu-vm ssh gpt-tiny-0" in out and "tpu-vm ssh gpt-tiny-1" in out
    assert "queued-resources delete gpt-tiny --zone z --force --quiet" in out


# --------------------------------------------------------------------------------------------
# The TPU VM supervisor against a simulated gcloud.

class FakeCloud(tpu_vm.Runner):
    """gcloud as the supervisor sees it: runs end with the scripted exit codes; a code None
    means the slice was preempted under the run (ssh fails, state SUSPENDED)."""

    def __init__(self, exits, created="ACTIVE", reachable=True):
        super().__init__(dry_run=False, out=open(os.devnull, "w"))
        self.exits, self.calls, self.state, self.running = list(exits), [], "MISSING", None
        self.created, self.reachable = created, reachable

    def __call__(self, argv, capture=False):
        verb = " ".join(argv[3:5])
        self.calls.append(verb)
        command = next((a for a in argv if a.startswith("--command=")), "")
        if verb.endswith("create"):
            self.state = self.created
        elif verb.endswith("delete"):
            self.state = "MISSING"
        elif verb.endswith("describe"):
            return (0, self.state + "\n") if self.state != "MISSING" else (1, "")
        elif "setsid" in command:
            self.running = self.exits.pop(0)
            if self.running is None:
                self.state = "SUSPENDED"
        elif "llmjax-exit-code 2>/dev/null" in command:
            if self.state != "ACTIVE" or not self.reachable:
                return 255, ""
            return 0, "".join(f"exit {self.running}\n" for _ in range(4))
        return 0, ""


def _supervise(exits, max_restarts=3, **fake):
    job = _job()
    cloud = FakeCloud(exits, **fake)
    s = tpu_vm.Slice(lookup("v5e-16"), job.name, "z", spot=True)
    code = tpu_vm.supervise(job, s, archive="a.tgz", max_restarts=max_restarts, run=cloud,
                            poll_seconds=0, sleep=lambda _: None)
    return code, cloud.calls.count("queued-resources create"), cloud


@pytest.mark.parametrize("exits,max_restarts,code,creates,runs", [
    ([0], 3, 0, 1, 1),                      # done
    ([75, 0], 3, 0, 1, 2),                  # preempted, slice still there: relaunch only
    ([None, 75, 0], 3, 0, 2, 3),            # slice reclaimed: recreate, set up, relaunch
    ([2], 3, 2, 1, 1),                      # user error: never relaunched
    ([1, 1, 1, 1, 1], 2, 1, 1, 3),          # budget of 2 relaunches spent
])
def test_tpu_vm_relaunch_loop(exits, max_restarts, code, creates, runs):
    got, created, cloud = _supervise(exits, max_restarts)
    assert (got, created) == (code, creates)
    assert len(cloud.exits) == len(exits) - runs


@pytest.mark.parametrize("fake,words", [
    ({"created": "FAILED"}, "ended in state FAILED"),
    ({"reachable": False}, "cannot reach the workers of gpt-tiny over ssh (10 polls in a row)"),
])
def test_tpu_vm_gives_up_with_a_message(fake, words):
    with pytest.raises(RuntimeError, match=re.escape(words)):
        _supervise([0], **fake)


@pytest.mark.parametrize("lines,code", [
    (["exit 0", "exit 0"], 0), (["exit 0", "running"], None), (["exit 75", "exit 1"], 75),
    (["exit 1", "exit 0"], 1), (["exit 75", "exit 2"], 2), ([], None), (["garbage"], None),
])
def test_run_outcome_from_worker_lines(lines, code):
    assert tpu_vm.outcome(lines) == code


# --------------------------------------------------------------------------------------------
# SLURM: the rendered script, run by bash with srun / scontrol stand-ins.

def _run_sbatch(tmp_path, code, restart_count=None, max_restarts=2):
    job = train_job(CONFIG, [], bucket=None, data_dir=None, name=None, remote=None,
                    python=str(tmp_path / "bin" / "fakepython"))
    script = tmp_path / "job.sh"
    script.write_text(slurm.sbatch_script(job, nodes=2, gpus_per_node=8,
                                          max_restarts=max_restarts, coordinator_port=1234))
    _fake_bin(tmp_path, "scontrol", 'if [ "$1" = show ]; then printf "gpu-a7\\ngpu-a9\\n"; '
                                    f'else echo "$*" >> {tmp_path}/requeued; fi\n')
    # srun: run the task once per node, as SLURM would (SLURM_PROCID 0..N-1), highest code wins
    _fake_bin(tmp_path, "srun", 'shift; worst=0; for i in 0 1; do SLURM_PROCID=$i "$@"; c=$?; '
                                '[ $c -gt $worst ] && worst=$c; done; exit $worst\n')
    _fake_bin(tmp_path, "fakepython", f'echo "$JAX_PROCESS_ID $JAX_NUM_PROCESSES '
                                      f'$JAX_COORDINATOR_ADDRESS $*" >> {tmp_path}/tasks; '
                                      f'exit {code}\n')
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-a[7,9]",
           "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242"}
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = str(restart_count)
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    tasks = (tmp_path / "tasks").read_text().splitlines()
    requeued = (tmp_path / "requeued").read_text() if (tmp_path / "requeued").exists() else ""
    return proc.returncode, tasks, requeued


@pytest.mark.parametrize("code,restart_count,requeue", [
    (0, None, False), (2, None, False), (75, None, True), (1, 1, True), (75, 2, False)])
def test_sbatch_script_wires_jax_and_requeues(tmp_path, code, restart_count, requeue):
    rc, tasks, requeued = _run_sbatch(tmp_path, code, restart_count)
    assert rc == code
    assert sorted(t.split()[0] for t in tasks) == ["0", "1"]
    assert {t.split()[1] for t in tasks} == {"2"}
    assert {t.split()[2] for t in tasks} == {"gpu-a7:1234"}  # first node of the allocation
    assert tasks[0].split()[3:6] == ["-m", "llmjax", "train"]
    assert (requeued == "requeue 4242\n") == requeue


def test_slurm_dry_run(capsys):
    assert cli.main(["launch", "slurm", CONFIG, "--nodes", "4", "--gpus-per-node", "4",
                     "--partition", "a100", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/usr/bin/env bash") and "#SBATCH --nodes=4" in out
    assert "#SBATCH --partition=a100" in out and "#SBATCH --gpus-per-node=4" in out


# --------------------------------------------------------------------------------------------
# tpu/*.sh (the manual steps) print, with DRY_RUN=1, the commands `llmjax launch tpu-vm` runs.

def _script_commands(script: str, **env) -> list[list[str]]:
    base = {"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "TPU_NAME": "run1", "ZONE": "us-east5-a",
            "PROJECT": "proj", "ACCELERATOR": "v5p-8", "RUNTIME": "v2-alpha-tpuv5"}
    out = subprocess.run(["bash", str(ROOT / "tpu" / script)], env={**base, **env},
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines()]


@pytest.mark.parametrize("spot", [False, True])
def test_tpu_scripts_match_the_launcher(spot):
    s = tpu_vm.Slice(lookup("v5p-8"), "run1", "us-east5-a", "proj", spot=spot)
    env = {"SPOT": "1"} if spot else {}
    expected = tpu_vm.create_commands(s) + ([tpu_vm.state_command(s)] if spot else [])
    assert _script_commands("create.sh", **env) == expected
    assert _script_commands("stop.sh", **env) == tpu_vm.delete_commands(s)


# --------------------------------------------------------------------------------------------
# Without --dry-run: the YAML goes to `kubectl apply -f -`, the script to `sbatch`; a missing
# tool is a one-line error.

@pytest.mark.parametrize("engine,tool,argv", [
    ("gke", "kubectl", ["--tpu", "v5p-8", "--image", "i", "--bucket", "gs://b/r"]),
    ("slurm", "sbatch", ["--nodes", "2"]),
])
def test_launch_hands_its_output_to_the_tool(engine, tool, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    (tmp_path / "bin").mkdir()
    assert cli.main(["launch", engine, CONFIG, *argv]) == 2
    assert f"{tool} is not on PATH" in capsys.readouterr().err
    _fake_bin(tmp_path, tool, f'echo "$*" > {tmp_path}/args; /bin/cat > {tmp_path}/input\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    assert cli.main(["launch", engine, CONFIG, *argv]) == 0
    received = (tmp_path / "input").read_text()
    if tool == "kubectl":
        assert (tmp_path / "args").read_text().split() == ["apply", "-f", "-"]
        check_jobset(yaml.safe_load(received))
    else:
        assert received.startswith("#!/usr/bin/env bash") and "srun" in received
