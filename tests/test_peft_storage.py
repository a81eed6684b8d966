"""PEFT runs reference their frozen base instead of storing it, and `llmjax export` / `peft merge`
work from run directories: a tiny LLaMA with tied embeddings pretrained 2 steps on one device,
then LoRA fine-tuned 4 steps untied (so the new lm_head is a frozen leaf the base lacks) with
fsdp=2 (checkpoints at 2 and 4). One base run and one LoRA run are shared by the module; the
persistent compilation cache makes the later runs of the same shapes cheap."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

import llmjax
from llmjax import cli, config, peft
from llmjax.checkpoint import CheckpointError, save_params
from llmjax.checkpoint.trees import tree_metadata as _tree_metadata
from llmjax.loader import load_model as load_source
from llmjax.export import export_run
from llmjax.models import Transformer
from llmjax.train.trainer import train
from llmjax.tree import flatten

REPO = Path(__file__).resolve().parents[1]
TOKENS = np.array([[11, 200, 301, 42, 150, 7, 99, 500]], np.int32)


def overrides(run_dir, *extra):
    return ["model=llama-tiny", "train.seq_len=16", "train.batch_size=8", "train.log_every=1",
            f"train.run_dir={run_dir}", "train.progress=false", "train.tensorboard=false",
            "train.compilation_cache=", "train.eval_steps=0", "mesh.data=1", "mesh.fsdp=2",
            "data.synthetic_num_documents=64", "optimizer.warmup_steps=0", *extra]


# The base ties its head, the LoRA run unties it (a new frozen head): a deliberate change.
LORA = ["train.steps=4", "checkpoint.every=2", "peft.rank=4", "optimizer.learning_rate=1e-2",
        "train.init_override=[tie_embeddings]"]


def lora_config(run_dir, base, *extra):
    tok = Path(base).parent / "tok"
    return config.load(REPO / "configs/experiments/peft-lora.yaml", overrides(
        run_dir, *LORA, f"train.init_from={base}", f"data.tokenizer={tok}", *extra))


def devices():
    return jax.devices()[:2]


def dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def flat(tree) -> dict:
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(tree).items()}


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def merged_logits(cfg, state) -> np.ndarray:
    """The fine-tuned model's logits from the run's in-memory state (no checkpoint code)."""
    plan = peft.build(cfg.peft)
    params = jax.device_get(plan.merge(state.params, state.frozen))
    model = Transformer(plan.model_config(cfg.model))
    return np.asarray(model.apply({"params": params}, TOKENS)["logits"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_storage")
    from llmjax.data.tokenizer import train_sentencepiece
    tok = root / "tok"  # the fine-tune's tokenizer: exports must carry it
    train_sentencepiece([REPO / "README.md", REPO / "docs/peft.md"], tok, vocab_size=500)
    base = train(config.load(REPO / "configs/experiments/gpt-tiny.yaml", overrides(
        root / "base", "train.steps=2", "model.tie_embeddings=true", "mesh.fsdp=1")),
        devices=jax.devices()[:1])
    cfg = lora_config(root / "lora", root / "base")
    lora = train(cfg, devices=devices())
    assert lora.checkpoint_step == 4
    return {"root": root, "base": base, "lora": lora, "cfg": cfg,
            "logits": merged_logits(cfg, lora.state)}


def test_checkpoints_hold_no_frozen_base_and_reference_it(runs):
    run = runs["root"] / "lora"
    for step in (2, 4):
        keys = _tree_metadata(run / "checkpoints" / str(step) / "state")
        # only the new lm_head (not in the tied base, frozen under LoRA) is stored
        assert [k for k in keys if k.startswith("frozen/")] == ["frozen/lm_head/kernel"], keys
        assert [k for k in keys if k.endswith("lora_a")]
        meta = json.loads((run / "checkpoints" / str(step) / "meta" / "metadata").read_text())
        assert meta["base"]["path"] == str(runs["root"] / "base" / "checkpoints" / "2")
        assert "decoder/layers/attention/query/kernel" in meta["base"]["leaves"]
    # The whole run directory is smaller than one checkpoint of the base.
    assert dir_bytes(run) < 0.5 * dir_bytes(runs["root"] / "base" / "checkpoints" / "2")


def test_resume_restores_the_base_and_is_bit_exact(runs):
    resumed_dir = runs["root"] / "resumed"
    shutil.copytree(runs["root"] / "lora", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "4")
    result = train(lora_config(resumed_dir, runs["root"] / "base"), devices=devices())
    assert result.resumed_from == 2
    straight = runs["lora"].state
    assert_trees_equal((result.state.params, result.state.opt_state, result.state.frozen),
                       (straight.params, straight.opt_state, straight.frozen))
    # frozen leaves keep the shardings a fresh start gives them
    for a, b in zip(jax.tree.leaves(result.state.frozen), jax.tree.leaves(straight.frozen)):
        assert a.sharding == b.sharding


def test_checkpoints_without_a_base_reference_still_resume(runs, monkeypatch):
    """Checkpoints written before base referencing (frozen stored in full) resume as before."""
    old_dir = runs["root"] / "old_format"
    import llmjax.peft.base_ref as base_ref
    monkeypatch.setattr(base_ref, "reference", lambda *a: None)
    train(lora_config(old_dir, runs["root"] / "base"), devices=devices())
    keys = _tree_metadata(old_dir / "checkpoints" / "2" / "state")
    assert [k for k in keys if k.startswith("frozen/")]
    shutil.rmtree(old_dir / "checkpoints" / "4")
    monkeypatch.undo()
    result = train(lora_config(old_dir, runs["root"] / "base"), devices=devices())
    assert result.resumed_from == 2
    assert_trees_equal((result.state.params, result.state.opt_state),
                       (runs["lora"].state.params, runs["lora"].state.opt_state))


def _point_base(run_dir: Path, base_path: Path) -> None:
    """Rewrite the base path recorded in every checkpoint (as if the base had moved)."""
    for meta_path in run_dir.glob("checkpoints/*/meta/metadata"):
        meta = json.loads(meta_path.read_text())
        meta["base"]["path"] = str(base_path)
        meta_path.write_text(json.dumps(meta))


def test_moved_or_changed_base_fails_in_one_line_and_a_relocated_copy_resumes(runs, capsys):
    root = runs["root"]
    source = load_source(root / "base")
    copy = save_params(root / "base_copy", source.params, source.model)
    changed = dict(source.params)
    changed["decoder"] = jax.tree.map(lambda x: x, source.params["decoder"])
    changed["decoder"]["final_norm"] = {"scale": source.params["decoder"]["final_norm"]["scale"]
                                        + 1e-3}
    changed_dir = save_params(root / "base_changed", changed, source.model)

    run = root / "moved"
    shutil.copytree(root / "lora", run)
    shutil.rmtree(run / "checkpoints" / "4")
    _point_base(run, changed_dir)
    args = ["train", str(REPO / "configs/experiments/peft-lora.yaml"),
            *overrides(run, *LORA, "mesh.data=-1", f"train.init_from={root / 'nowhere'}",
                       f"data.tokenizer={root / 'tok'}")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("llmjax: error:"), err
    assert str(changed_dir) in err and "fingerprint" in err and "train.init_from" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2"]  # nothing lost

    _point_base(run, root / "gone")
    with pytest.raises(CheckpointError, match=r"gone.*missing"):
        train(lora_config(run, root / "nowhere"), devices=devices())
    # The same base elsewhere (fingerprint-checked) continues the run exactly.
    result = train(lora_config(run, copy), devices=devices())
    assert result.resumed_from == 2
    assert_trees_equal(result.state.params, runs["lora"].state.params)


def test_export_merged_matches_the_run_and_converts_to_transformers(runs, tmp_path):
    out = tmp_path / "export"
    assert cli.main(["export", str(runs["root"] / "lora"), str(out)]) == 0
    model = llmjax.from_pretrained(out)
    np.testing.assert_allclose(model.logits(TOKENS), runs["logits"], atol=1e-5)
    from llmjax.data.tokenizer import load_tokenizer
    text = "fine-tuned export"
    assert model.tokenizer.encode(text) == load_tokenizer(runs["root"] / "tok").encode(text)
    # an earlier step, chosen explicitly, is a different model
    early = llmjax.from_pretrained(export_run(runs["root"] / "lora", tmp_path / "early", step=2))
    assert np.abs(early.logits(TOKENS) - runs["logits"]).max() > 1e-4

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    assert cli.main(["convert", "llmjax-to-hf", str(out), str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf",
                                                       attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ref, runs["logits"], atol=1e-4)


def test_export_refuses_to_overwrite(runs, tmp_path, capsys):
    run = str(runs["root"] / "lora")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert cli.main(["export", run, str(other)]) == 2
    assert "not an llmjax export" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    out = tmp_path / "out"
    assert cli.main(["export", run, str(out), "--adapter-only"]) == 0
    assert cli.main(["export", run, str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", run, str(out), "--force"]) == 0
    assert "peft_adapter" not in (out / "config.yaml").read_text()  # replaced by the merged one
    assert cli.main(["export", run, str(out), "--step", "3"]) == 2
    assert "steps: 2, 4" in capsys.readouterr().err


def test_documented_sequence_peft_merge_of_the_run_adapter(runs, tmp_path):
    """pretrain -> finetune init_from=RUN (LoRA) -> peft merge RUN2/adapter OUT ->
    from_pretrained(OUT) gives the run's logits."""
    adapter = runs["root"] / "lora" / "adapter"
    # LoRA leaves + the frozen 128 KiB lm_head the base lacks; the base checkpoint is ~1.5 MB
    assert dir_bytes(adapter) < 0.2 * dir_bytes(runs["root"] / "base" / "checkpoints" / "2")
    out = tmp_path / "merged"
    assert cli.main(["peft", "merge", str(adapter), str(out)]) == 0
    np.testing.assert_allclose(llmjax.from_pretrained(out).logits(TOKENS), runs["logits"],
                               atol=1e-5)
    # the adapter export of the run, merged onto the base given as its run directory (what
    # adapters written before base references record), is the same model
    exported = export_run(runs["root"] / "lora", tmp_path / "adapter", adapter_only=True)
    out2 = tmp_path / "merged2"
    assert cli.main(["peft", "merge", str(exported), str(out2), "--base",
                     str(runs["root"] / "base")]) == 0
    np.testing.assert_allclose(llmjax.from_pretrained(out2).logits(TOKENS), runs["logits"],
                               atol=1e-5)
    # onto another base: refused (fingerprint), nothing written
    source = load_source(runs["root"] / "base")
    other = save_params(tmp_path / "other", jax.tree.map(lambda x: x * 1.01, source.params),
                        source.model)
    with pytest.raises(CheckpointError, match="not the base the adapter was trained on"):
        peft.merge_checkpoint(exported, tmp_path / "merged3", other)
    assert not (tmp_path / "merged3").exists()


def test_init_from_a_referencing_peft_run_points_to_export(runs):
    with pytest.raises(CheckpointError, match=r"llmjax export"):
        train(lora_config(runs["root"] / "chained", runs["root"] / "lora"), devices=devices())


def test_frozen_leaves_not_from_the_base_are_kept_by_the_adapter(runs):
    """The run's adapter holds the LoRA leaves and the frozen lm_head the base lacks, so
    adapter + base is the whole model (peft merge of it is tested above)."""
    adapter, _, stored = peft.load_adapter(runs["root"] / "lora" / "adapter")
    assert sorted(adapter) == ["decoder", "lm_head"]
    np.testing.assert_array_equal(np.asarray(adapter["lm_head"]["kernel"]),
                                  np.asarray(runs["lora"].state.frozen["lm_head"]["kernel"]))
    ref = stored["base_ref"]
    assert ref["fingerprint"] and "lm_head/kernel" not in ref["leaves"]


def test_finetune_from_an_export_references_it_instead_of_copying(runs, tmp_path):
    """PretrainedModel.finetune of a model loaded from an llmjax export (unchanged) makes the
    run reference that export: no base copy in the run directory."""
    export = export_run(runs["root"] / "base", tmp_path / "base_export")
    model = llmjax.from_pretrained(export, tie_embeddings=False)  # as the LoRA run's model
    sections = runs["cfg"].to_dict()
    del sections["model"]
    for key in ("run_dir", "init_from"):
        sections["train"].pop(key)
    tuned = model.finetune(sections, tmp_path / "run", devices=devices())
    assert not (tmp_path / "run" / "base").exists()
    meta = json.loads((tmp_path / "run" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["base"]["path"] == str(export)
    np.testing.assert_allclose(tuned.logits(TOKENS), runs["logits"], atol=1e-5)
