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

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
    "slow": ("test_kernels", "test_peft_sharded", "test_docs_commands", "test_splash",
             "test_logits_chunk", "test_parallel", "test_train_step", "test_benchmarks",
             "test_convert_hf", "test_peft_storage", "test_eval_tasks"),
    "multiprocess": ("test_multihost", "test_run_safety", "test_checkpoint"),
    "network": ("test_convert_gguf", "test_checkpoint_finetune"),
}
_HELP = {"slow": "a module of 20-170 s (kernels, sharded-vs-single-device, documented commands, "
                 "transformers parity)",
         "multiprocess": "starts jax processes (kill -9, signals, jax.distributed on 127.0.0.1)",
         "network": "fetches a model or data set from PyPI on first use (cached after)"}


def pytest_configure(config):
    for name, text in _HELP.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    import pytest
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        for name, modules in MARKERS.items():
            if module in modules:
                item.add_marker(getattr(pytest.mark, name))
        if "minilm" in item.name:  # the real MiniLM encoder comes from PyPI
            item.add_marker(pytest.mark.network)
