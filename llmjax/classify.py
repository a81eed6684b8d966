"""Predictions and evaluation of a fine-tuned classifier (`PretrainedModel.classify`, `llmjax eval`).

Texts are framed exactly as the training pipeline frames them ([CLS] a [SEP] (b [SEP]),
llmjax.data.examples.frame_classification), sorted by length and run in batches padded to
a multiple of 16 tokens, so a few compiled shapes serve any list of texts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

PAD_MULTIPLE = 16


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The most probable label of one text and every label's probability."""

    label: str
    probabilities: dict[str, float]


def label_names_of(model: Any) -> list[str]:
    """The model's label names (from its run), or "0".."n-1" when it has none recorded."""
    n = model.config.num_labels
    if not n:
        raise ValueError("this model has no classification head (model.num_labels=0); fine-tune it with "
                         "objective classification first, or load it with num_labels=N")
    names = list(getattr(model, "label_names", ()) or [])
    return names if len(names) == n else [str(i) for i in range(n)]


def class_probabilities(model: Any, texts: Sequence[Any], max_length: Optional[int] = None,
                        batch_size: int = 64) -> np.ndarray:
    """[len(texts), num_labels] softmax probabilities; a text is a string or a (text, pair) tuple."""
    from llmjax.data.examples import frame_classification

    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: classify needs one to frame the texts")
    label_names_of(model)  # fails early without a classification head
    special = model.tokenizer.special_ids
    length = min(max_length or model.config.max_len, model.config.max_len)
    framed = []
    for item in texts:
        first, second = (item, None) if isinstance(item, str) else tuple(item)
        framed.append(frame_classification(model.tokenizer.encode(first),
                                           None if second is None else model.tokenizer.encode(second),
                                           special, length)[:2])
    probs = np.zeros((len(framed), model.config.num_labels), np.float64)
    order = sorted(range(len(framed)), key=lambda i: len(framed[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = min(-(-max(len(framed[i][0]) for i in chunk) // PAD_MULTIPLE) * PAD_MULTIPLE, length)
        ids, mask, types = (np.zeros((len(chunk), width), np.int32) for _ in range(3))
        for row, i in enumerate(chunk):
            tokens, token_types = framed[i]
            ids[row, :len(tokens)], mask[row, :len(tokens)], types[row, :len(tokens)] = tokens, 1, token_types
        logits = np.asarray(model.outputs(ids, attention_mask=mask, token_type_ids=types)["class_logits"],
                            np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        exp = np.exp(logits)
        probs[chunk] = exp / exp.sum(axis=-1, keepdims=True)
    return probs


def classify(model: Any, texts: Any, max_length: Optional[int] = None, batch_size: int = 64) -> Any:
    """One Prediction per text (a single text in, a single Prediction out)."""
    single = isinstance(texts, str) or (isinstance(texts, tuple) and len(texts) == 2
                                        and all(isinstance(t, str) for t in texts))
    items = [texts] if single else list(texts)
    names = label_names_of(model)
    probs = class_probabilities(model, items, max_length, batch_size)
    out = [Prediction(names[int(np.argmax(p))], {n: float(v) for n, v in zip(names, p)}) for p in probs]
    return out[0] if single else out


@dataclasses.dataclass
class Report:
    """Accuracy, per-class precision / recall / F1 and confusion counts (rows: true, columns: predicted)."""

    label_names: list[str]
    confusion: np.ndarray

    @property
    def examples(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.examples, 1))

    def per_class(self) -> dict[str, dict[str, float]]:
        out = {}
        for i, name in enumerate(self.label_names):
            hit, predicted, true = self.confusion[i, i], self.confusion[:, i].sum(), self.confusion[i].sum()
            precision = hit / predicted if predicted else 0.0
            recall = hit / true if true else 0.0
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
            out[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                         "support": int(true)}
        return out

    def format(self) -> str:
        width = max(len(n) for n in self.label_names + ["label"])
        lines = [f"examples {self.examples}, accuracy {self.accuracy:.4f}", "",
                 f"{'label':<{width}}  precision  recall      f1  support"]
        for name, m in self.per_class().items():
            lines.append(f"{name:<{width}}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  "
                         f"{m['support']:7d}")
        macro = np.mean([m["f1"] for m in self.per_class().values()])
        lines += [f"{'macro F1':<{width}}  {'':9}  {'':6}  {macro:6.4f}", "",
                  "confusion (rows: true label, columns: predicted)"]
        cell = max(width, len(str(self.confusion.max())))
        lines.append(" " * (width + 2) + "  ".join(f"{n:>{cell}}" for n in self.label_names))
        for name, row in zip(self.label_names, self.confusion):
            lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{cell}d}" for v in row))
        return "\n".join(lines)


def report(true: Sequence[str], predicted: Sequence[str], label_names: Sequence[str]) -> Report:
    """The Report of predicted vs true label names."""
    index = {name: i for i, name in enumerate(label_names)}
    confusion = np.zeros((len(index), len(index)), np.int64)
    for t, p in zip(true, predicted):
        confusion[index[t], index[p]] += 1
    return Report(list(label_names), confusion)


def evaluate_files(model: Any, data: Any, files: Sequence[str], max_length: Optional[int] = None,
                   key: str = "--data") -> Report:
    """Classify every row of labelled `files` (columns as in DataConfig `data`) and report."""
    from llmjax.data.labelled import labelled_files, open_labelled

    names = label_names_of(model)
    data = dataclasses.replace(data, label_names=names)
    source = open_labelled(data, "validation", labelled_files(files, key))
    rows = source.rows
    items = [text if not source.pair_field else (text, pair) for text, pair, _ in rows]
    probs = class_probabilities(model, items, max_length)
    return report([label for _, _, label in rows], [names[i] for i in probs.argmax(axis=-1)], names)
