"""Long rows: a packed 32K-token lm batch from a small text corpus, with segment ids and
positions that restart per document, every segment a whole document (or a row-sized chunk
of the one longer than a row); train.seq_len of 32K+ validates for RoPE models."""
import pathlib
import random

import numpy as np
import pytest

from llmjax.config import from_dict
from llmjax.data.config import DataConfig
from llmjax.data.pipeline import make_iterator
from llmjax.data.tokenizer import load_tokenizer, train_sentencepiece

SEQ = 32768
WORDS = "the king queen lord lady sword crown night day love death war peace fool wise".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Four files of paragraphs (~270K tokens in all), one paragraph longer than a row."""
    root = tmp_path_factory.mktemp("long")
    rng = random.Random(3)
    (root / "texts").mkdir()
    for f in range(4):
        paragraphs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 1500)))
                      for _ in range(12)]
        if f == 0:
            paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(40000)))
        (root / "texts" / f"f{f}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    train_sentencepiece(sorted((root / "texts").glob("*.txt")), root / "tok", vocab_size=400)
    config = DataConfig(source="text", paths=[str(root / "texts" / "*.txt")],
                        document_unit="paragraph", data_dir=str(root / "tfds"),
                        tokenizer=str(root / "tok"), seed=5)
    tokenizer = load_tokenizer(root / "tok")
    documents = []
    for path in sorted((root / "texts").glob("*.txt")):
        for text in path.read_text(encoding="utf-8").split("\n\n"):
            documents.append(tokenizer.encode(text) + [tokenizer.special_ids["eos"]])
    return config, documents, tokenizer


def test_packed_32k_batch_has_per_document_segments_and_positions(corpus):
    config, documents, _ = corpus
    chunks = {tuple(ids[i:i + SEQ]) for ids in documents for i in range(0, len(ids), SEQ)}
    iterator = make_iterator(config, "lm", SEQ, 2, process_index=0, process_count=1)
    batch = next(iterator)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, SEQ) for k in
                                                      ("tokens", "segment_ids", "positions")}
    for tokens, segments, positions in zip(batch["tokens"], batch["segment_ids"],
                                           batch["positions"]):
        used = int(np.count_nonzero(segments))
        assert (segments[:used] > 0).all() and not segments[used:].any()  # padding at the end
        assert (np.diff(segments[:used]) >= 0).all() and np.diff(segments[:used]).max() <= 1
        assert segments.max() >= 2  # several documents in one row
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))
            assert tuple(tokens[where].tolist()) in chunks
    assert iterator.stats()["packing_efficiency"] > 0.5


def test_pack_split_fills_every_row_and_resumes_mid_document(corpus):
    """data.pack_split: rows hold no padding until the epoch's last; in stream order the
    segments are the documents cut at row ends (every token once); a state saved with a
    document half emitted resumes at the same token."""
    import dataclasses

    config, _, tokenizer = corpus
    config = dataclasses.replace(config, pack_split=True, shuffle=False)
    iterator = make_iterator(config, "lm", SEQ, 1, process_index=0, process_count=1,
                             num_epochs=1)
    rows = list(iterator)
    assert all(np.count_nonzero(row["segment_ids"]) == SEQ for row in rows[:-1])
    assert iterator.stats()["packing_efficiency"] > 0.9
    emitted = np.concatenate([row["tokens"][0][row["segment_ids"][0] > 0] for row in rows])
    source = iterator.source  # unshuffled: the documents in the prepared dataset's order
    eos = [tokenizer.special_ids["eos"]]
    expected = [tokenizer.encode(source[i]["text"]) + eos for i in range(len(source))]
    np.testing.assert_array_equal(emitted, np.concatenate(expected))
    for row in rows:  # positions restart in every segment, continuations included
        segments, positions = row["segment_ids"][0], row["positions"][0]
        for s in range(1, segments.max() + 1):
            where = np.flatnonzero(segments == s)
            np.testing.assert_array_equal(positions[where], np.arange(len(where)))

    first = make_iterator(config, "lm", SEQ, 1, process_index=0, process_count=1)
    next(first)
    state = first.get_state()
    assert state["pack_split"] and state["streams"][0][2] > 0  # mid-document
    resumed = make_iterator(config, "lm", SEQ, 1, process_index=0, process_count=1)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["tokens"], rows[1]["tokens"])


def test_train_seq_len_of_128k_validates_for_rope_models():
    cfg = from_dict({"model": {"preset": "llama-tiny", "rope_scaling": "llama3",
                               "rope_scaling_factor": 8.0, "rope_original_max_len": 8192},
                     "train": {"seq_len": 131072}})
    assert cfg.train.seq_len == 131072 and cfg.model.rope_original_len == 8192
