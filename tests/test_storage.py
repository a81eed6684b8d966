"""Every user path on object storage, against a real GCS server (fake-gcs-server on
127.0.0.1, the `gcs_bucket` fixture of conftest.py): bad schemes, a missing bucket and
missing credentials are one-line errors; `llmjax data prepare` into gs:// and training from
it; metrics as chunk objects; no local path containing `gs:` is ever created.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from llmjax import cli, config, paths
from llmjax.config import ConfigError
from llmjax.errors import MissingInputError
from helpers import TEXT

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bad, fixed", [("gs:/bucket/run", "gs://bucket/run"),
                                        ("gs:bucket/run", "gs://bucket/run"),
                                        ("gcs://bucket/run", "gs://bucket/run"),
                                        ("GS://bucket/run", "gs://bucket/run"),
                                        ("s3:/bucket/run", "s3://bucket/run")])
def test_misspelled_schemes_are_one_line_errors_naming_the_fix(bad, fixed):
    with pytest.raises(ConfigError) as err:
        paths.check(bad, "train.run_dir")
    message = str(err.value)
    assert "\n" not in message and repr(bad) in message and fixed in message


def test_unsupported_scheme_and_missing_bucket_name():
    with pytest.raises(ConfigError, match="unsupported scheme 'http'"):
        paths.check("http://example.com/x", "data.data_dir")
    with pytest.raises(ConfigError, match="names no bucket"):
        paths.check("gs://", "data.data_dir")
    assert paths.check("runs/a:b", "train.run_dir") == "runs/a:b"  # a local name with ':'


@pytest.mark.parametrize("bucket", ["b", "ab", "Bucket", "-bucket", "bucket-", "a" * 64, "my..bucket",
                                    "my bucket"])
def test_invalid_gcs_bucket_names_are_refused_up_front(bucket):
    """tensorstore (the checkpoint arrays) refuses them only at the first save, after training."""
    with pytest.raises(ConfigError, match="not a valid GCS bucket name") as err:
        paths.check(f"gs://{bucket}/run", "train.run_dir")
    assert "\n" not in str(err.value) and repr(bucket) in str(err.value)
    for good in ("abc", "my-bucket_1", "a.b.c", "x" * 63):
        assert paths.check(f"gs://{good}/run") == f"gs://{good}/run"


def test_bad_scheme_in_a_run_fails_before_anything_is_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["train", str(REPO / "configs/experiments/gpt-tiny.yaml"), "train.run_dir=gs:/b/run"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "gs://b/run" in err, err
    assert not os.path.exists(tmp_path / "gs:")


def test_s3_without_its_client_names_the_extra():
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    with pytest.raises(ConfigError, match=r"s3fs.*llmjax\[s3\]"):
        paths.resolve("s3://bucket/run", "train.run_dir")


def test_missing_bucket_is_a_one_line_error(gcs_bucket, tmp_path, capsys):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist") as err:
        paths.resolve("gs://no-such-bucket/run", "train.run_dir")
    assert "gs://no-such-bucket/run" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "a.txt").write_text(TEXT)
    code = cli.main(["data", "prepare", "--paths", str(tmp_path / "a.txt"), "--data-dir",
                     "gs://no-such-bucket/data", "--tokenizer", "gs://no-such-bucket/tok"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "no-such-bucket" in err and "does not exist" in err, err


def test_missing_credentials_is_a_one_line_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "no-key.json"))
    paths._google_default_credentials.cache_clear()
    try:
        with pytest.raises(ConfigError, match="no Google Cloud credentials") as err:
            paths.resolve("gs://some-bucket/run", "train.run_dir")
    finally:
        paths._google_default_credentials.cache_clear()
    message = str(err.value)
    assert "\n" not in message and "gs://some-bucket/run" in message
    assert "gcloud auth application-default login" in message and "STORAGE_EMULATOR_HOST" in message


def test_epath_and_glob_on_the_bucket(gcs_bucket):
    base = f"{gcs_bucket}/glob"
    for name in ("a.txt", "b.txt", "sub/c.txt", "d.md"):
        paths.resolve(f"{base}/{name}").write_text(name)
    assert paths.glob(f"{base}/*.txt") == [f"{base}/a.txt", f"{base}/b.txt"]
    assert paths.glob(f"{base}/**/*.txt") == [f"{base}/a.txt", f"{base}/b.txt", f"{base}/sub/c.txt"]
    with pytest.raises(MissingInputError, match="does not exist"):
        paths.require(f"{base}/none.txt", "data.tokenizer")


def test_prepare_writes_the_dataset_into_the_bucket(prepared):
    infos = paths.glob(f"{prepared['data_dir']}/llmjax_text/*/1.0.0/dataset_info.json")
    assert len(infos) == 1
    shards = paths.glob(f"{prepared['data_dir']}/llmjax_text/*/1.0.0/*.array_record-*")
    assert {s.split("/")[-1].split(".")[0] for s in shards} == {"llmjax_text-train", "llmjax_text-validation"}
    assert paths.resolve(f"{prepared['tok']}/spm.model").exists()


def test_training_reads_the_bucket_dataset(prepared, tmp_path, monkeypatch):
    """The gs:// dataset, fetched into a fresh, empty cache, holds exactly the paragraphs of the
    text files (train + validation). (test_storage_train.py trains from it.)"""
    from llmjax.data.sources import open_source, split_documents

    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "fresh-cache"))  # nothing mirrored yet
    data = config.load(REPO / "configs/experiments/gpt-tiny.yaml", [
        "data.source=text", f"data.paths=[{prepared['text']}]", "data.validation_fraction=0.3",
        "data.document_unit=paragraph", f"data.data_dir={prepared['data_dir']}",
        f"data.tokenizer={prepared['tok']}"]).data
    read = [open_source(data, split)[i]["text"] for split in ("train", "validation")
            for i in range(len(open_source(data, split)))]
    expected = [d for f in sorted(prepared["local"].glob("*.txt")) for d in split_documents(f.read_text(), "paragraph")]
    assert sorted(read) == sorted(expected) and len(open_source(data, "validation")) > 0
    assert (tmp_path / "fresh-cache" / "remote" / "gs").is_dir()  # read through the local mirror


def test_a_tfds_dataset_in_a_bucket_data_dir_opens_by_name(prepared, tmp_path, monkeypatch):
    """`source: tfds` with a gs:// data_dir: the dataset's version directory is mirrored once."""
    from llmjax.data.sources import open_tfds

    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "fresh-cache"))
    (info,) = paths.glob(f"{prepared['data_dir']}/llmjax_text/*/1.0.0/dataset_info.json")
    name = "llmjax_text/" + info.split("/")[-3]
    train = open_tfds(name, prepared["data_dir"], "train", ["text"])
    validation = open_tfds(name, prepared["data_dir"], "validation", ["text"])
    assert len(train) + len(validation) == 12 and len(validation) > 0
    assert "The quick brown fox" in train[0]["text"]


def test_metrics_on_the_bucket_are_chunks_that_resume_trims(gcs_bucket):
    from llmjax.metrics import MetricsWriter, read_metrics
    from llmjax.plot import read_metrics as plot_read

    run = f"{gcs_bucket}/metrics-run"
    writer = MetricsWriter(run, tensorboard=True, start_step=0)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 10.0 - step})
    writer.flush()  # as at a checkpoint: chunk 0
    for step in (4, 5):
        writer.write(step, {"loss": 10.0 - step})
    writer.close()  # chunk 1
    root = paths.resolve(run)
    assert sorted(p.name for p in root.joinpath("metrics").iterdir()) == ["000000000000.jsonl", "000000000001.jsonl"]
    assert not root.joinpath("metrics.jsonl").exists()  # never a growing object
    events = sorted(p.name for p in root.joinpath("tensorboard").iterdir())
    assert events == ["events.out.tfevents.000000000000.llmjax", "events.out.tfevents.000000000001.llmjax"]
    rows = read_metrics(f"{run}/metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(s, 10.0 - s) for s in range(1, 6)]
    assert plot_read(run) == rows
    from llmjax.plot import plot_runs

    assert plot_runs([run]).read_bytes()[:4] == b"\x89PNG"  # curves.png written into the bucket

    # A run resumed from step 4 drops step 5 (written after its last checkpoint), with its events.
    MetricsWriter(run, tensorboard=True, start_step=4).close()
    assert [r["step"] for r in read_metrics(f"{run}/metrics.jsonl")] == [1, 2, 3, 4]
    assert len(list(root.joinpath("tensorboard").iterdir())) == 2
    MetricsWriter(run, tensorboard=True, start_step=2).close()  # the whole newest chunk goes
    assert [r["step"] for r in read_metrics(f"{run}/metrics.jsonl")] == [1, 2]
    assert [p.name for p in root.joinpath("tensorboard").iterdir()] == ["events.out.tfevents.000000000000.llmjax"]


def test_labelled_files_on_the_bucket_read_like_local_ones(gcs_bucket, tmp_path):
    from llmjax.data.labelled import labelled_files, read_labelled

    (tmp_path / "a.csv").write_text("text,label\nhello there,pos\n\"a, quoted\",neg\n")
    paths.upload(tmp_path / "a.csv", f"{gcs_bucket}/labelled/a.csv")
    assert labelled_files([f"{gcs_bucket}/labelled/*.csv"], "data.train_files") == [f"{gcs_bucket}/labelled/a.csv"]
    assert read_labelled(f"{gcs_bucket}/labelled/a.csv", "text", "label") == \
        read_labelled(str(tmp_path / "a.csv"), "text", "label")


def test_from_pretrained_and_convert_to_and_from_the_bucket(gcs_bucket, capsys):
    """llmjax export -> gs://, `convert llmjax-to-hf` gs:// -> gs://, `convert hf-to-llmjax`
    gs:// -> gs://, from_pretrained(gs://): the parameters come back exactly."""
    from llmjax.config import model_config
    from llmjax.models.api import abstract_params
    from llmjax.pretrained import PretrainedModel, from_pretrained
    from llmjax.tree import flatten, unflatten

    cfg = model_config("llama-tiny", vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=48, max_len=32)
    rng = np.random.default_rng(0)  # numpy values: no compiled init needed
    params = unflatten({k: rng.standard_normal(v.shape).astype(v.dtype)
                        for k, v in flatten(abstract_params(cfg, boxed=False)).items()})
    base = f"{gcs_bucket}/models"
    PretrainedModel(cfg, params).save(f"{base}/export")
    assert paths.resolve(f"{base}/export/config.yaml").exists()
    assert cli.main(["convert", "llmjax-to-hf", f"{base}/export", f"{base}/hf"]) == 0
    assert paths.resolve(f"{base}/hf/config.json").exists() and paths.glob(f"{base}/hf/*.safetensors")
    assert cli.main(["convert", "hf-to-llmjax", f"{base}/hf", f"{base}/back"]) == 0
    loaded = flatten(from_pretrained(f"{base}/back").params)  # export -> hf -> export, all on gs://
    for key, value in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(loaded[key]), np.asarray(value), err_msg=key)
    # An export over an existing one needs --force, on the bucket as on disk.
    assert cli.main(["convert", "hf-to-llmjax", f"{base}/hf", f"{base}/back"]) == 2
    assert "--force" in capsys.readouterr().err


def test_gguf_from_the_bucket(gcs_bucket, tmp_path):
    """`convert gguf-to-llmjax gs://...gguf gs://...` and from_pretrained(gs://...gguf) (fetched
    once into the cache) give the parameters the GGUF file was written from."""
    pytest.importorskip("gguf")
    from llmjax.config import model_config
    from llmjax.models.api import abstract_params
    from llmjax.pretrained import from_pretrained
    from llmjax.tree import flatten, unflatten
    from test_security import TINY, _write_gguf

    cfg = model_config("llama-tiny", **TINY, tie_embeddings=False)
    rng = np.random.default_rng(1)
    params = unflatten({k: rng.standard_normal(v.shape).astype(np.float32)
                        for k, v in flatten(abstract_params(cfg, boxed=False)).items()})
    source = f"{gcs_bucket}/gguf/tiny.gguf"
    paths.upload(_write_gguf(tmp_path / "tiny.gguf", cfg, params), source)
    assert cli.main(["convert", "gguf-to-llmjax", source, f"{gcs_bucket}/gguf/llmjax"]) == 0
    for loaded in (from_pretrained(f"{gcs_bucket}/gguf/llmjax"), from_pretrained(source)):
        flat = flatten(loaded.params)
        for key, value in flatten(params).items():
            np.testing.assert_allclose(np.asarray(flat[key], np.float32), value, rtol=0, atol=1e-6, err_msg=key)


def test_data_state_of_two_processes_continues_on_one_and_back():
    """A checkpoint's per-process data states re-divided for another process count (what a
    run moved between 2 hosts and 1 does, llmjax/checkpoint/data_state.py): the following
    global batches are the same rows."""
    from llmjax.config import DataConfig
    from llmjax.data.pipeline import make_iterator

    data = DataConfig(source="synthetic", synthetic_num_documents=50)

    def iterators(count):
        return [make_iterator(data, "lm", 16, 8, process_index=i, process_count=count,
                              vocab_size=512) for i in range(count)]

    def global_batch(its):
        return np.concatenate([next(it)["tokens"] for it in its])

    two, one = iterators(2), iterators(1)
    for _ in range(5):
        np.testing.assert_array_equal(global_batch(two), global_batch(one))
    moved_to_one = iterators(1)
    moved_to_one[0].set_state([it.get_state() for it in two])
    moved_to_two = iterators(2)
    for it in moved_to_two:
        it.set_state([one[0].get_state()])
    for _ in range(3):
        want = global_batch(one)
        np.testing.assert_array_equal(global_batch(moved_to_one), want)
        np.testing.assert_array_equal(global_batch(moved_to_two), want)
        global_batch(two)
    with pytest.raises(ValueError, match="seq_len: saved 16 vs now 32"):
        make_iterator(data, "lm", 32, 8, process_index=0, process_count=1,
                      vocab_size=512).set_state([it.get_state() for it in two])


def test_move_on_the_bucket_copies_then_deletes(gcs_bucket, tmp_path):
    """What setting a torn checkpoint aside and committing an export do on object storage
    (no rename there): the objects arrive under the new name, the old names are gone, and the
    listing this process cached is not stale."""
    base = f"{gcs_bucket}/move"
    for name in ("3/a", "3/sub/b", "4/c"):
        paths.resolve(f"{base}/checkpoints/{name}").write_text(name)
    listing = paths.resolve(f"{base}/checkpoints")
    assert sorted(p.name for p in listing.iterdir()) == ["3", "4"]
    moved = paths.move(listing / "3", f"{base}/aside/3-1")
    assert str(moved) == f"{base}/aside/3-1"
    assert sorted(p.name for p in listing.iterdir()) == ["4"]
    assert (moved / "sub" / "b").read_text() == "3/sub/b" and (moved / "a").read_text() == "3/a"
    with pytest.raises(FileExistsError):
        paths.move(f"{base}/checkpoints/4", f"{base}/aside/3-1")
    paths.move(f"{base}/checkpoints/4/c", f"{base}/c")
    assert paths.resolve(f"{base}/c").read_text() == "4/c"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    assert (paths.move(tmp_path / "d", tmp_path / "e") / "x").read_text() == "x"


def test_no_local_path_named_gs_was_created(tmp_path_factory):
    """Runs last in this module: pathlib would have turned gs://b/x into a local gs:/b/x."""
    roots = [Path.cwd(), REPO, tmp_path_factory.getbasetemp(), Path(paths.cache_root())]
    for root in roots:
        if root.is_dir():
            found = [str(p) for p in root.rglob("gs:*")]
            assert not found, found


def test_dpo_reference_cache_file_on_the_bucket(gcs_bucket):
    """objective.reference=cached keeps its scores beside the run on object storage too:
    written as one object, read back with its keys."""
    import numpy as np
    from llmjax.train import reference_cache
    path = reference_cache.cache_path(f"{gcs_bucket}/dpo-run", "train")
    assert reference_cache.read(path) is None
    chosen, rejected = np.array([-1.5, -2.0], np.float32), np.array([-3.0, -0.25], np.float32)
    reference_cache.write(path, chosen, rejected, "data-key", "params-key")
    saved = reference_cache.read(path)
    assert str(path) == f"{gcs_bucket}/dpo-run/reference_logprobs/train.npz"
    np.testing.assert_array_equal(saved["chosen"], chosen)
    np.testing.assert_array_equal(saved["rejected"], rejected)
    assert (saved["data"], saved["params"]) == ("data-key", "params-key")
