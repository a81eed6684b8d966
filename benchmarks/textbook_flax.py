"""The reference GPT written the way the Flax examples write it: an independent baseline.

No llmjax code: `nn.Embed` / `nn.LayerNorm` / `nn.Dense` / `nn.dot_product_attention`,
a Python loop over the layers, the tied head through `Embed.attend`,
`optax.softmax_cross_entropy_with_integer_labels`, optax AdamW + global-norm clipping, one
`jax.jit` with the state donated. Same initial weights as the other variants (copied from
llmjax's tree), same batches; bf16 = `dtype=bfloat16` modules over fp32 parameters.
This is what the issue calls "a straightforward Flax linen step".
"""
from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import REFERENCE


class Block(nn.Module):
    d: int
    heads: int
    d_ff: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, mask):
        hd = self.d // self.heads
        y = nn.LayerNorm(1e-5, dtype=self.dtype, name="ln1")(x)
        qkv = nn.Dense(3 * self.d, dtype=self.dtype, name="qkv")(y)
        q, k, v = jnp.split(qkv.reshape(*x.shape[:2], 3 * self.heads, hd), 3, axis=2)
        o = nn.dot_product_attention(q, k, v, mask=mask, dtype=self.dtype)
        x = x + nn.Dense(self.d, dtype=self.dtype, name="out")(o.reshape(x.shape))
        y = nn.LayerNorm(1e-5, dtype=self.dtype, name="ln2")(x)
        y = nn.gelu(nn.Dense(self.d_ff, dtype=self.dtype, name="fc")(y))
        return x + nn.Dense(self.d, dtype=self.dtype, name="proj")(y)


class GPT(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        r = REFERENCE
        wte = nn.Embed(r["vocab"], r["d_model"], dtype=self.dtype, name="wte")
        wpe = nn.Embed(r["seq"], r["d_model"], dtype=self.dtype, name="wpe")
        x = wte(tokens) + wpe(jnp.arange(tokens.shape[1])[None])
        mask = nn.make_causal_mask(tokens)
        for i in range(r["layers"]):
            x = Block(r["d_model"], r["heads"], r["d_ff"], self.dtype, name=f"h{i}")(x, mask)
        x = nn.LayerNorm(1e-5, dtype=self.dtype, name="ln_f")(x)
        return wte.attend(x).astype(jnp.float32)


def params_from_llmjax(p: dict) -> dict:
    """llmjax's reference-GPT parameters in this model's layout (the same weights)."""
    emb, dec = p["embed"], p["decoder"]
    lay, d = dec["layers"], REFERENCE["d_model"]
    a = lay["attention"]
    ln = lambda n, i: {"scale": lay[n]["scale"][i], "bias": lay[n]["bias"][i]}  # noqa: E731
    out = {"wte": {"embedding": emb["token"]["embedding"]},
           "wpe": {"embedding": emb["position"]["embedding"]},
           "ln_f": {"scale": dec["final_norm"]["scale"], "bias": dec["final_norm"]["bias"]}}
    for i in range(REFERENCE["layers"]):
        out[f"h{i}"] = {
            "ln1": ln("attention_norm", i), "ln2": ln("mlp_norm", i),
            "qkv": {"kernel": np.concatenate([np.asarray(a[n]["kernel"][i]).reshape(d, d)
                                              for n in ("query", "key", "value")], axis=1),
                    "bias": np.concatenate([np.asarray(a[n]["bias"][i]).reshape(d)
                                            for n in ("query", "key", "value")])},
            "out": {"kernel": np.asarray(a["out"]["kernel"][i]).reshape(d, d),
                    "bias": a["out"]["bias"][i]},
            "fc": {"kernel": lay["mlp"]["wi"]["kernel"][i], "bias": lay["mlp"]["wi"]["bias"][i]},
            "proj": {"kernel": lay["mlp"]["wo"]["kernel"][i], "bias": lay["mlp"]["wo"]["bias"][i]},
        }
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)


class TextbookFlaxRunner:
    """Same interface as common.JaxRunner: compile(batch) and step(batch)."""

    def __init__(self, llmjax_params: dict, bf16: bool, lr: float = 1e-3):
        model = GPT(jnp.bfloat16 if bf16 else jnp.float32)
        self.params = params_from_llmjax(llmjax_params)
        decay = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)  # noqa: E731  matrices only
        self.tx = optax.chain(optax.clip_by_global_norm(1.0),
                              optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                          mask=decay))
        self.opt_state = self.tx.init(self.params)

        def loss_fn(params, tokens):
            logits = model.apply({"params": params}, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], tokens[:, 1:]).mean()

        def step(params, opt_state, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step_fn = jax.jit(step, donate_argnums=(0, 1))

    def _run(self, batch) -> float:
        self.params, self.opt_state, loss = self.step_fn(self.params, self.opt_state,
                                                         batch["tokens"])
        return float(loss)

    def compile(self, batch) -> tuple[float, float]:
        t = time.perf_counter()
        loss = self._run(batch)
        return time.perf_counter() - t, loss

    def step(self, batch) -> tuple[float, float]:
        t = time.perf_counter()
        loss = self._run(batch)
        return time.perf_counter() - t, loss
