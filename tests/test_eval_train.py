"""eval.tasks during training: the bundled multiple-choice, cloze and generation tasks are
scored every eval.every steps and at the end, logged as tasks/<task>/<metric> rows beside the
held-out loss, and the final scores equal an unsharded evaluation of the saved checkpoint.
Bad task names, missing task files and a missing lm_eval are ConfigErrors before training."""
import importlib.util
from pathlib import Path

import pytest

from llmjax import config
from llmjax.config import ConfigError
from llmjax.errors import MissingInputError
from llmjax.metrics import read_metrics
from llmjax.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
GPT = REPO / "configs/experiments/gpt-tiny.yaml"
TASKS = ["tiny_mc", "tiny_cloze", "tiny_gen"]
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="needs the [eval] extra (lm_eval)")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from llmjax.data.tokenizer import train_sentencepiece
    from llmjax.evaluation.task_files import BUNDLED_TASKS

    root = tmp_path_factory.mktemp("tok")
    text = root / "tasks.txt"  # the tasks' own words: short pieces, few bytes per token
    text.write_text("".join((BUNDLED_TASKS / f"{t}.jsonl").read_text() for t in TASKS) * 3)
    train_sentencepiece([text], root / "tok", vocab_size=512, num_sentinels=0)
    return root / "tok"


def _config(run_dir, tokenizer, *extra):
    return config.load(GPT, [
        "train.steps=4", "train.seq_len=32", "train.batch_size=8", "train.log_every=2",
        f"train.run_dir={run_dir}", "train.progress=false", "train.eval_steps=1",
        "train.compilation_cache=", "train.plot=false", "mesh.data=-1", "checkpoint.every=0",
        "data.synthetic_num_documents=64", f"data.tokenizer={tokenizer}", *extra])


@needs_lm_eval
def test_tasks_are_logged_every_n_steps_and_match_the_saved_model(tmp_path, tokenizer):
    from llmjax.evaluation.harness import LlmjaxLM, evaluate_tasks, plain_results

    cfg = _config(tmp_path / "run", tokenizer, f"eval.tasks={TASKS}", "eval.every=2",
                  "eval.limit=4", "eval.max_gen_toks=6")
    result = train(cfg)
    rows = read_metrics(result.run_dir / "metrics.jsonl")
    task_rows = {r["step"]: r for r in rows if "tasks/tiny_mc/acc" in r}
    assert sorted(task_rows) == [2, 4] and all(r["split"] == "eval" for r in task_rows.values())
    names = {"tasks/tiny_mc/acc", "tasks/tiny_mc/acc_norm", "tasks/tiny_cloze/perplexity",
             "tasks/tiny_cloze/acc", "tasks/tiny_gen/exact_match"}
    assert names <= set(task_rows[4])
    assert any("loss" in r and r["split"] == "eval" for r in rows)  # held-out eval still runs
    # The trainer scored the sharded (8-device) state; the saved model, unsharded, agrees
    # (the scored tasks: tests/test_eval_tasks.py checks generation against generate()).
    lm = LlmjaxLM(str(result.run_dir), batch_rows=8)
    direct = plain_results(evaluate_tasks(lm, TASKS[:2], limit=4))
    for name in names - {"tasks/tiny_gen/exact_match"}:
        _, task, metric = name.split("/")
        assert task_rows[4][name] == pytest.approx(direct[task][metric], rel=1e-5), name


def test_bad_tasks_fail_before_training(tmp_path, tokenizer, monkeypatch):
    import llmjax.train.trainer as trainer

    monkeypatch.setattr(trainer, "build", lambda *a, **k: pytest.fail("built the model"))
    if importlib.util.find_spec("lm_eval") is not None:
        with pytest.raises(ConfigError, match=r"eval.tasks: task 'tiny_nope' is neither a "
                                              r"bundled task \(tiny_cloze, tiny_gen, tiny_mc\)"):
            train(_config(tmp_path / "run", tokenizer, "eval.tasks=[tiny_nope]"))
        with pytest.raises(MissingInputError, match=r"eval.tasks: task file .*gone.yaml does "
                                                    r"not exist"):
            train(_config(tmp_path / "run", tokenizer, f"eval.tasks=[{tmp_path}/gone.yaml]"))
        with pytest.raises(ConfigError, match=r"eval.tasks are text: set data.tokenizer"):
            train(_config(tmp_path / "run", tokenizer, "eval.tasks=[tiny_mc]", "data.tokenizer="))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r"eval.tasks=\['tiny_mc'\] needs lm-evaluation-"
                                          r"harness: pip install 'llmjax\[eval\]'"):
        _config(tmp_path / "run", tokenizer, "eval.tasks=[tiny_mc]")
