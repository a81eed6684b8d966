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
