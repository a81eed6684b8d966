"""lm-evaluation-harness through llmjax: the bundled 20-item multiple-choice task scores what
a hand count says it must; generate_until cuts at stop strings; missing task files and a
missing extra are one-line errors. Skipped without the [eval] extra (lm_eval)."""
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from llmjax.cli import main  # noqa: E402
from llmjax.config import model_config  # noqa: E402
from llmjax.errors import MissingInputError  # noqa: E402
from llmjax.data.tokenizer import HFTokenizer  # noqa: E402
from llmjax.evaluation import harness  # noqa: E402
from llmjax.generate import generate  # noqa: E402
from llmjax.models import init_params  # noqa: E402
from llmjax.pretrained import PretrainedModel  # noqa: E402

TASK = harness.BUNDLED_TASKS / "tiny_mc.yaml"


def _char_tokenizer(path):
    """One id per character of the bundled tasks (and their templates), plus <eos>."""
    from tokenizers import Tokenizer, models

    text = "".join(p.read_text() for p in sorted(harness.BUNDLED_TASKS.glob("*.jsonl")))
    text += "Question:\nAnswer"
    chars = sorted(set(text) - {"\n"}) + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    return HFTokenizer(path, special_tokens={"eos": "<eos>"})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tok = _char_tokenizer(tmp_path_factory.mktemp("tok") / "chars")
    cfg = model_config("llama-tiny", vocab_size=tok.vocab_size, d_model=32, num_layers=1,
                       num_heads=4, d_ff=48, max_len=128)
    params = init_params(cfg, jax.random.key(0))
    zero = jax.tree.map(np.zeros_like, params)
    return (PretrainedModel(cfg, zero, tok, "uniform"),
            PretrainedModel(cfg, params, tok, "random"))


def test_bundled_multiple_choice_accuracy_equals_the_hand_count(models):
    """All-zero weights give every token probability 1/V, so a choice of n characters scores
    -(n + 1) log V (its leading space included): `acc` picks the shortest choice and
    `acc_norm` (divided by n) the longest. In tiny_mc.jsonl the answer is the shortest choice
    in items 1-13, the longest in items 14-18 and neither in 19-20 (all lengths distinct)."""
    lm = harness.LlmjaxLM(models[0], batch_rows=4)
    results = harness.plain_results(harness.evaluate_tasks(lm, [str(TASK)]))
    assert results["tiny_mc"]["acc"] == 13 / 20
    assert results["tiny_mc"]["acc_norm"] == 5 / 20


def test_bundled_cloze_perplexity_equals_the_hand_count(models):
    """Uniform model: the last word w (with its leading space) scores -(len(w) + 1) log V, so
    lm-eval's perplexity is V ** mean(len(w) + 1); greedy picks id 0 (the space) everywhere,
    so no word is greedy (acc 0)."""
    lm = harness.LlmjaxLM(models[0], batch_rows=4)
    results = harness.plain_results(harness.evaluate_tasks(lm, ["tiny_cloze"]))
    words = [json.loads(line)["word"] for line in
             (harness.BUNDLED_TASKS / "tiny_cloze.jsonl").read_text().splitlines()]
    vocab = models[0].config.vocab_size
    expected = vocab ** np.mean([len(w) + 1 for w in words])
    assert results["tiny_cloze"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert results["tiny_cloze"]["acc"] == 0.0


def test_generate_until_stops_at_the_first_stop_string(models):
    model = models[1]
    lm = harness.LlmjaxLM(model, batch_rows=4)  # one chunk: the same compiled program
    contexts = ["Question: What", "Answer: the", "Question: Who wrote"]
    full = [model.tokenizer.decode(ids) for ids in generate(
        model.config, model.params, [model.tokenizer.encode(c) for c in contexts],
        max_new_tokens=12, eos_id=model.tokenizer.special_ids.get("eos"))]
    stop = full[0][3:5]  # a stop string the first continuation meets
    requests = [SimpleNamespace(args=(c, {"until": [stop], "max_gen_toks": 12}))
                for c in contexts]
    got = lm.generate_until(requests)
    assert got == [text[:text.find(stop)] if stop in text else text for text in full]
    assert got[0] == full[0][:full[0].find(stop)] and len(got[0]) <= 3


def test_cli_runs_a_task_file_and_writes_json(models, tmp_path, capsys):
    models[0].save(tmp_path / "uniform")
    out = tmp_path / "results.json"
    code = main(["eval-tasks", str(tmp_path / "uniform"), "--tasks", "tiny_mc", "--limit", "5",
                 "--output", str(out)])
    assert code == 0 and "| tiny_mc | acc | 1.0000 |" in capsys.readouterr().out
    assert json.loads(out.read_text())["tiny_mc"]["acc"] == 1.0  # items 1-5: the shortest


def test_a_task_naming_a_missing_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TASK.read_text().replace("tiny_mc.jsonl", "nowhere.jsonl"))
    with pytest.raises(MissingInputError, match=r"names data file nowhere.jsonl for split 'test'"):
        harness.load_task(str(bad))
    code = main(["eval-tasks", str(tmp_path / "no-model"), "--tasks", str(tmp_path / "x.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("llmjax: error: task file") and "\n" not in err
