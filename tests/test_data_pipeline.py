"""Pipeline: packing, epochs, per-host sharding, resume, objective-specific batches, device placement."""
import collections
import dataclasses
import json
import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from llmjax.data.config import DataConfig
from llmjax.data.pipeline import make_iterator, shuffled_index
from llmjax.data.sources import SyntheticSource
from llmjax.data.tokenizer import load_tokenizer, train_sentencepiece

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = "the king queen lord lady sword crown night day love death war peace fool wise".split()
EOS = 3


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    """Ten files of blank-line-separated paragraphs (one very long), a BPE tokenizer, and a data config."""
    root = tmp_path_factory.mktemp("pipeline")
    rng = random.Random(1)
    (root / "texts").mkdir()
    for f in range(10):
        paragraphs = []
        for _ in range(rng.randint(3, 12)):
            lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 5))]
            paragraphs.append("\n".join(lines))
        if f == 0:
            paragraphs.append(" ".join(rng.choice(WORDS) for _ in range(400)))  # longer than any row
        (root / "texts" / f"f{f}.txt").write_text("\n\n".join(paragraphs), encoding="utf-8")
    train_sentencepiece(sorted((root / "texts").glob("*.txt")), root / "tok", vocab_size=400)
    config = DataConfig(source="text", paths=[str(root / "texts" / "*.txt")], document_unit="paragraph",
                        data_dir=str(root / "tfds"), tokenizer=str(root / "tok"), seed=7)
    return config, load_tokenizer(root / "tok")


def _reference_documents(config, tokenizer):
    """Every training paragraph tokenized straight from the raw files, plus eos."""
    texts = []
    for path in sorted(pathlib.Path(config.paths[0]).parent.glob("*.txt")):
        texts += [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return [tokenizer.encode(t) + [EOS] for t in texts]


def _segments(batch):
    """Token lists of every (row, segment) of an lm batch."""
    out = []
    for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
        for s in range(1, segments.max() + 1):
            out.append(tokens[segments == s].tolist())
    return out


def _epoch(config, seq_len, batch_size, **kwargs):
    it = make_iterator(config, "lm", seq_len, batch_size, process_index=0, process_count=1, num_epochs=1, **kwargs)
    return list(it), it


def test_packing_emits_every_token_exactly_once_per_epoch(text_setup):
    config, tokenizer = text_setup
    seq_len = 64
    batches, _ = _epoch(config, seq_len, 4)
    got = sorted(tuple(s) for b in batches for s in _segments(b))
    want = sorted(tuple(doc[i:i + seq_len]) for doc in _reference_documents(config, tokenizer)
                  for i in range(0, len(doc), seq_len))
    assert got == want


def test_document_longer_than_row_is_split_not_dropped(text_setup):
    config, tokenizer = text_setup
    longest = max(_reference_documents(config, tokenizer), key=len)
    assert len(longest) > 3 * 64
    batches, it = _epoch(config, 64, 2)
    chunks = {tuple(s) for b in batches for s in _segments(b)}
    assert all(tuple(longest[i:i + 64]) in chunks for i in range(0, len(longest), 64))
    assert it.stats()["split_documents"] >= 1


def test_segment_ids_and_positions_restart_per_document(text_setup):
    config, _ = text_setup
    batch = next(make_iterator(config, "lm", 64, 4, process_index=0, process_count=1))
    for segments, positions, tokens in zip(batch["segment_ids"], batch["positions"], batch["tokens"]):
        real = segments > 0
        assert (tokens[~real] == 0).all() and (positions[~real] == 0).all()
        ids = segments[real]
        assert (np.diff(ids) >= 0).all() and ids[0] == 1  # 1, 2, 3... left to right, padding at the end
        for s in np.unique(ids):
            np.testing.assert_array_equal(positions[segments == s], np.arange((segments == s).sum()))
        assert real[: real.sum()].all()


def test_unpacked_rows_hold_one_document_chunk_each(text_setup):
    config, tokenizer = text_setup
    from dataclasses import replace
    batches, _ = _epoch(replace(config, pack=False), 64, 4)
    rows = [s for b in batches for s in _segments(b)]
    assert all(b["segment_ids"].max() <= 1 for b in batches)
    assert len(rows) == sum((len(d) + 63) // 64 for d in _reference_documents(config, tokenizer))


def test_packing_efficiency_is_counted(text_setup):
    config, _ = text_setup
    it = make_iterator(config, "lm", 64, 4, process_index=0, process_count=1)
    batches = [next(it) for _ in range(5)]
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert it.stats()["packing_efficiency"] == pytest.approx(real / (5 * 4 * 64))


def test_shuffled_index_is_a_seeded_permutation():
    order = [shuffled_index(i, 1000, seed=3, epoch=0) for i in range(1000)]
    assert sorted(order) == list(range(1000)) and order != list(range(1000))
    assert order == [shuffled_index(i, 1000, seed=3, epoch=0) for i in range(1000)]
    assert order != [shuffled_index(i, 1000, seed=3, epoch=1) for i in range(1000)]


def test_two_hosts_batches_are_disjoint_and_form_the_single_host_batch(text_setup):
    config, _ = text_setup
    single = make_iterator(config, "lm", 64, 8, process_index=0, process_count=1)
    hosts = [make_iterator(config, "lm", 64, 8, process_index=h, process_count=2) for h in range(2)]
    for _ in range(6):
        whole, parts = next(single), [next(h) for h in hosts]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        rows = [{tuple(r) for r in p["tokens"]} for p in parts]
        assert not rows[0] & rows[1]


RESUME_SCRIPT = """
import json, sys
import numpy as np
from llmjax.data.config import DataConfig
from llmjax.data.pipeline import make_iterator
config = DataConfig(**json.loads(sys.argv[1]))
it = make_iterator(config, "lm", 64, 4, process_index=0, process_count=1)
it.set_state(json.loads(sys.argv[2]))
np.savez(sys.argv[3], *[next(it)["tokens"] for _ in range(3)])
"""


def test_resume_in_fresh_process_yields_the_uninterrupted_batches(text_setup, tmp_path):
    config, _ = text_setup
    it = make_iterator(config, "lm", 64, 4, process_index=0, process_count=1)
    for _ in range(7):  # more than one epoch of some streams
        next(it)
    state = json.dumps(it.get_state())
    expected = [next(it)["tokens"] for _ in range(3)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(config.__dict__), state, str(tmp_path / "b.npz")],
                   check=True, env=env, cwd=REPO)
    resumed = np.load(tmp_path / "b.npz")
    for i, want in enumerate(expected):
        np.testing.assert_array_equal(resumed[f"arr_{i}"], want)


def test_state_from_another_layout_is_rejected(text_setup):
    config, _ = text_setup
    state = make_iterator(config, "lm", 64, 4, process_index=0, process_count=1).get_state()
    with pytest.raises(ValueError, match="global_batch_size: saved 4 vs now 8"):
        make_iterator(config, "lm", 64, 8, process_index=0, process_count=1).set_state(state)


def test_nsp_second_segment_truly_continues_the_first(text_setup):
    config, tokenizer = text_setup
    batch = next(make_iterator(config, "nsp", 64, 8, process_index=0, process_count=1))
    assert batch["tokens_a"].shape == (8, 30) and batch["tokens_b"].shape == (8, 31)
    streams = []
    for path in sorted(pathlib.Path(config.paths[0]).parent.glob("*.txt")):
        for paragraph in path.read_text(encoding="utf-8").split("\n\n"):
            lines = [line for line in paragraph.split("\n") if line.strip()]
            streams.append(sum((tokenizer.encode(line) for line in lines), []))
    for a, b in zip(batch["tokens_a"], batch["tokens_b"]):
        pair = a[a > 0].tolist() + b[b > 0].tolist()
        assert len(a[a > 0]) and len(b[b > 0])
        assert any(_contains(s, pair) for s in streams)


def _contains(sequence, part):
    n = len(part)
    return any(sequence[i:i + n] == part for i in range(len(sequence) - n + 1))


SYNTHETIC = DataConfig(source="synthetic", shuffle=False, synthetic_vocab_size=500, synthetic_num_documents=50)


def test_seq2seq_rows_hold_each_record_input_and_target():
    batch = next(make_iterator(SYNTHETIC, "seq2seq", 80, 4, process_index=0, process_count=1, target_len=40))
    source = SyntheticSource(50, 500, 107, seed=0)
    for r in range(4):
        record = source[r]
        want_in, want_target = record["input"] + [EOS], record["target"] + [EOS]
        assert batch["inputs"][r, : len(want_in)].tolist() == want_in and not batch["inputs"][r, len(want_in):].any()
        assert batch["targets"][r, : len(want_target)].tolist() == want_target
    assert batch["targets"].shape == (4, 40)


def test_sft_loss_mask_covers_only_the_response():
    config = DataConfig(**{**SYNTHETIC.__dict__, "pack": False})
    batch = next(make_iterator(config, "sft", 128, 4, process_index=0, process_count=1))
    source = SyntheticSource(50, 500, 107, seed=0)
    for r in range(4):
        prompt, response = source[r]["input"], source[r]["target"] + [EOS]
        n = len(prompt) + len(response)
        assert batch["tokens"][r, :n].tolist() == prompt + response
        assert batch["loss_mask"][r].tolist() == [0] * len(prompt) + [1] * len(response) + [0] * (128 - n)


def test_classification_labels_come_from_the_records():
    source = SyntheticSource(50, 500, 107, seed=0)
    unpacked = dataclasses.replace(SYNTHETIC, pack=False)
    batch = next(make_iterator(unpacked, "classification", 128, 4, process_index=0, process_count=1))
    assert batch["labels"].tolist() == [source[r]["label"] for r in range(4)]
    assert (batch["tokens"][:, 0] == 5).all()  # [CLS]
    packed = next(make_iterator(SYNTHETIC, "classification", 128, 4, process_index=0, process_count=1))
    assert packed["labels"].shape == (4, 16)  # seq_len // 8 example slots per row
    assert packed["labels"][:, 0].tolist() == [source[r]["label"] for r in range(4)]  # row r starts with record r


def test_string_label_outside_label_names_is_a_clear_error():
    from llmjax.data.examples import ExampleBuilder
    from llmjax.data.tokenizer import SpecialTokens
    builder = ExampleBuilder("classification", {"input": "x", "label": "y"}, None, SpecialTokens(), 16, 16, True,
                             ["negative", "positive"])
    assert builder({"x": [9, 9], "y": "positive"})[0]["labels"].tolist() == [1]
    with pytest.raises(ValueError, match="'neutral' is not in data.label_names"):
        builder({"x": [9, 9], "y": "neutral"})


def test_to_global_places_host_batch_on_the_mesh():
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from llmjax.data.device import to_global
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch = next(make_iterator(SYNTHETIC, "classification", 32, 16, process_index=0, process_count=1))
    placed = to_global(batch, NamedSharding(mesh, PartitionSpec("data")))
    assert placed["tokens"].shape == (16, 32) and len(placed["tokens"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(placed["labels"]), batch["labels"])


def test_prefetcher_state_matches_the_last_yielded_batch():
    from llmjax.data.device import Prefetcher
    plain = make_iterator(SYNTHETIC, "lm", 32, 4, process_index=0, process_count=1)
    prefetched = Prefetcher(make_iterator(SYNTHETIC, "lm", 32, 4, process_index=0, process_count=1), size=3)
    for _ in range(4):
        np.testing.assert_array_equal(next(prefetched)["tokens"], next(plain)["tokens"])
    assert prefetched.get_state() == plain.get_state()
    prefetched.set_state(plain.get_state())
    np.testing.assert_array_equal(next(prefetched)["tokens"], next(plain)["tokens"])
    prefetched.close()


def test_unknown_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown batch kind 'mlm'"):
        make_iterator(SYNTHETIC, "mlm", 32, 4, process_index=0, process_count=1)


def test_batch_not_divisible_by_hosts_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the process count 4"):
        make_iterator(SYNTHETIC, "lm", 32, 6, process_index=0, process_count=4)
