"""Dropout as the families place it: every dropout site of a training forward pass, as
(rate, number of elements dropped), in llmjax and in `transformers` (eager attention) for
the same tiny config imported through from_pretrained: HF's rates must come through the
import (hidden and attention-probability dropout) and the sites must coincide, e.g. BERT
drops attention probabilities and has no dropout inside its MLP; T5 has one there.
Needs the [hf] extra (torch, transformers)."""
import collections

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.models import Transformer  # noqa: E402
from llmjax.pretrained import from_pretrained  # noqa: E402

V, B, L = 101, 2, 7


def _hf_models():
    T = transformers
    return {
        "bert": (T.BertForSequenceClassification,
                 T.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=24, max_position_embeddings=16, num_labels=3,
                              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.25)),
        "gpt2": (T.GPT2LMHeadModel,
                 T.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                              resid_pdrop=0.15, embd_pdrop=0.15, attn_pdrop=0.3)),
        "t5": (T.T5ForConditionalGeneration,
               T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_decoder_layers=1,
                          num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.2)),
        "llama": (T.LlamaForCausalLM,
                  T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                attention_dropout=0.35)),
    }


def _hf_sites(model, kwargs) -> collections.Counter:
    """(rate, elements) of every dropout HF applies in train mode (modules and functional calls)."""
    sites = collections.Counter()
    original = torch.nn.functional.dropout

    def recording(x, p=0.5, training=True, inplace=False):
        if training and p > 0:
            sites[(round(float(p), 6), x.numel())] += 1
        return original(x, p, training, inplace)

    torch.nn.functional.dropout = recording
    try:
        model.train()
        model(**kwargs)
    finally:
        torch.nn.functional.dropout = original
    return sites


def _llmjax_sites(pretrained, inputs) -> collections.Counter:
    sites = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.Dropout) and context.method_name == "__call__":
            deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else None)
            if not nn.merge_param("deterministic", module.deterministic, deterministic) and module.rate > 0:
                sites[(round(float(module.rate), 6), int(np.prod(args[0].shape)))] += 1
        return next_fun(*args, **kwargs)

    model = Transformer(pretrained.config)
    with nn.intercept_methods(interceptor):  # sites are recorded while tracing: no need to run
        jax.eval_shape(lambda params, kw: model.apply({"params": params}, **kw, deterministic=False,
                                                      rngs={"dropout": jax.random.key(0)}),
                       pretrained.params, inputs)
    return sites


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5", "llama"])
def test_dropout_sites_and_rates_match_transformers(family, tmp_path):
    cls, config = _hf_models()[family]
    config._attn_implementation = "eager"  # attention-probability dropout as an explicit call
    torch.manual_seed(0)
    hf = cls(config)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, scan_layers=False)
    ids = np.random.RandomState(0).randint(3, V, (B, L))
    kwargs = {"input_ids": torch.tensor(ids)}
    inputs = {"tokens": ids}
    if family == "t5":
        kwargs["decoder_input_ids"] = torch.tensor(ids[:, :5])
        inputs["decoder_tokens"] = ids[:, :5]
    expected = _hf_sites(hf, kwargs)
    assert expected, "the reference applied no dropout"
    assert _llmjax_sites(model, inputs) == expected


def test_dropout_rates_round_trip_through_export(tmp_path):
    cls, config = _hf_models()["bert"]
    cls(config).save_pretrained(tmp_path / "hf")
    model = from_pretrained(tmp_path / "hf")
    assert (model.config.dropout, model.config.attention_dropout) == (0.1, 0.25)
    model.save_hf(tmp_path / "out")
    again = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert (again.hidden_dropout_prob, again.attention_probs_dropout_prob) == (0.1, 0.25)
