"""One Transformer: blocks, layer stacks (scanned or unrolled) and the full model.

GPT-2, BERT, T5, PaLM and LLaMA are configurations of this file (see
configs/models/): pre/post norm, sequential or parallel block, learned /
rotary / relative positions, gated or plain MLP, MHA / MQA / GQA, tied or
untied head, encoder, decoder or encoder-decoder.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.models import ops
from llmjax.models.attention import Attention, make_mask
from llmjax.models.context import Context
from llmjax.models.heads import Heads
from llmjax.models.moe import ROUTER, MoeMlp
from llmjax.models.layers import (Adapter, Dense, Embed, Mlp, RelativeBias, constrain, dtype_of,
                                  make_norm, normal_init)

Array = jax.Array

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """One layer: attention (+ cross-attention) and MLP with residuals."""

    cfg: ModelConfig
    cross: bool = False
    decode: bool = False
    causal: bool = False
    moe: bool = False  # a mixture-of-experts MLP (llmjax/models/moe.py) instead of the Mlp

    @nn.compact
    def __call__(self, x: Array, ctx: Context, deterministic: bool = True):
        """x [b, t, d] -> (x [b, t, d], None) (the (carry, output) pair nn.scan expects)."""
        cfg = self.cfg
        drop = lambda h: nn.Dropout(cfg.dropout)(h, deterministic=deterministic)  # noqa: E731
        adapt = lambda h, name: Adapter(cfg.adapter_dim, cfg, name=name)(h) if cfg.adapter_dim else h  # noqa: E731,E501

        def self_attention(h):
            h = Attention(cfg, decode=self.decode, causal=self.causal, name="attention")(
                h, ctx, deterministic)
            return adapt(h, "attention_adapter")

        def cross_attention(h):
            return Attention(cfg, cross=True, name="cross_attention")(h, ctx, deterministic)

        def mlp(h):
            if self.moe:  # padding (segment 0) is routed nowhere
                return adapt(MoeMlp(cfg, name="mlp")(h, ctx.segments != 0, deterministic),
                             "mlp_adapter")
            return adapt(Mlp(cfg, name="mlp")(h, deterministic), "mlp_adapter")

        def residual(x, sublayer, norm):
            """x + sublayer(norm(x)) (pre-norm), or norm(x + sublayer(x)) (post-norm, BERT)."""
            if cfg.norm_position == "pre":
                return x + drop(sublayer(make_norm(cfg, norm)(x)))
            return make_norm(cfg, norm)(x + drop(sublayer(x)))

        if cfg.parallel_block:  # attention and MLP read the same normed input (PaLM)
            h = make_norm(cfg, "attention_norm")(x)
            x = x + drop(self_attention(h)) + drop(mlp(h))
        else:
            x = residual(x, self_attention, "attention_norm")
            if self.cross:
                x = residual(x, cross_attention, "cross_attention_norm")
            x = residual(x, mlp, "mlp_norm")
        x = constrain(x, ("batch", "length", "embed"))
        return x, None


class Stack(nn.Module):
    """num_layers Blocks under nn.scan (stacked params, constant compile time) or unrolled."""

    cfg: ModelConfig
    num_layers: int
    cross: bool = False
    decode: bool = False
    causal: bool = False  # self-attention is causal (decoders)

    @nn.compact
    def __call__(self, x: Array, ctx: Context, deterministic: bool = True) -> Array:
        """x [b, t, d] -> [b, t, d]; every layer sees the same `ctx`."""
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers, static_argnums=(3,))
        kwargs = dict(cfg=cfg, cross=self.cross, decode=self.decode, causal=self.causal)
        if cfg.scan_layers:
            # moe_every > 1 needs unrolled layers (config validation): scanned, all or none.
            kwargs["moe"] = cfg.is_moe_layer(0)
            layers = nn.scan(block, variable_axes={"params": 0, "cache": 0, ROUTER: 0},
                             split_rngs={"params": True, "dropout": True},
                             in_axes=nn.broadcast, length=self.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = layers(**kwargs, name="layers")(x, ctx, deterministic)
        else:
            for i in range(self.num_layers):
                x, _ = block(**kwargs, moe=cfg.is_moe_layer(i), name=f"layers_{i}")(
                    x, ctx, deterministic)
        if cfg.final_norm:
            x = make_norm(cfg, "final_norm")(x)
        if cfg.family == "t5":  # T5Stack drops out after its final norm
            x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        return x


class Embedder(nn.Module):
    """Token (+ learned position, + token type) embeddings, optional norm; the tied head."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, stddev=cfg.initializer_range)
        self.token = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), **kw,
                           kernels=cfg.kernels)
        if cfg.position == "learned":
            self.position = Embed(cfg.max_len, cfg.d_model, ("position", "embed"), **kw)
        if cfg.num_token_types:
            self.token_type = Embed(cfg.num_token_types, cfg.d_model, ("token_types", "embed"),
                                    **kw)
        if cfg.embed_norm:
            self.norm = make_norm(cfg, "norm")

    def __call__(self, tokens: Array, positions: Array, token_types: Optional[Array]) -> Array:
        x = self.token(tokens)  # [b, t, d]
        if self.cfg.position == "learned":
            x = x + self.position(positions)
        if self.cfg.num_token_types:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + self.token_type(types)
        if self.cfg.embed_norm:
            x = self.norm(x)
        return x

    def attend(self, x: Array) -> Array:
        return self.token.attend(x)


def input_defaults(tokens: Array, segment_ids: Optional[Array], positions: Optional[Array]
                   ) -> tuple[Array, Array]:
    """int32 (segments, positions) [b, t]: one document per row and positions restarting at
    every document where not given."""
    segments = jnp.ones_like(tokens, jnp.int32) if segment_ids is None else segment_ids
    segments = segments.astype(jnp.int32)
    if positions is None:
        positions = default_positions(segments)
    return segments, positions.astype(jnp.int32)


def default_positions(segments: Array) -> Array:
    """0, 1, 2, ... restarting at every new segment (packed documents)."""
    idx = jnp.arange(segments.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                              segments[:, 1:] != segments[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)


class Transformer(nn.Module):
    """The model. Use only through init/apply; returns a dict of named outputs.

    Decoder-only: `tokens` -> logits. Encoder: `tokens` -> hidden, mlm logits,
    pooled / nsp / class logits. Encoder-decoder: `tokens` (encoder) and
    `decoder_tokens` -> logits. Segment ids: 0 = padding, k = k-th packed document.
    """

    cfg: ModelConfig
    decode: bool = False

    def setup(self):
        cfg = self.cfg
        self.embed = Embedder(cfg)
        if cfg.prompt_tokens:  # prompt tuning: learned virtual tokens before the input
            self.prompt = self.param(
                "prompt", nn.with_logical_partitioning(normal_init(cfg.initializer_range),
                                                       ("prompt", "embed")),
                (cfg.prompt_tokens, cfg.d_model), dtype_of(cfg.param_dtype))
        if cfg.architecture == "encoder_decoder":
            self.encoder_bias = RelativeBias(cfg, bidirectional=True)
            self.decoder_bias = RelativeBias(cfg, bidirectional=False)
        elif cfg.position == "relative":
            self.relative_bias = RelativeBias(cfg, bidirectional=cfg.architecture == "encoder")
        if not cfg.tie_embeddings and cfg.architecture != "encoder":
            self.lm_head = Dense((cfg.vocab_size,), ("embed", "vocab"), dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, stddev=cfg.initializer_range,
                                 kernels=cfg.kernels)
        if cfg.architecture == "encoder_decoder":
            self.encoder = Stack(cfg, cfg.num_layers)
            self.decoder = Stack(cfg, cfg.decoder_layers, cross=True, decode=self.decode,
                                 causal=True)
        elif cfg.architecture == "encoder":
            self.encoder = Stack(cfg, cfg.num_layers)
        else:
            self.decoder = Stack(cfg, cfg.num_layers, decode=self.decode, causal=True)
        self.heads = Heads(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, token_types: Optional[Array] = None,
                 prefix_mask: Optional[Array] = None, decoder_tokens: Optional[Array] = None,
                 decoder_segment_ids: Optional[Array] = None,
                 decoder_positions: Optional[Array] = None,
                 deterministic: bool = True, logits: bool = True,
                 pool_index: Optional[Array] = None) -> dict[str, Array]:
        """Outputs by name: `hidden`, `logits` (decoders; `logits=False` leaves them to the
        loss, which applies `lm_logits` chunk by chunk: train.logits_chunk), head outputs.
        `pool_index` [b, s]: positions the pooler / classifier read (packed classification)."""
        cfg = self.cfg
        if cfg.architecture == "encoder_decoder":
            encoded, enc_segments, enc_positions = self.encode(
                tokens, segment_ids, positions, deterministic=deterministic)
            if decoder_tokens is None:
                raise ValueError("an encoder-decoder model needs decoder_tokens")
            return self.decode_step(decoder_tokens, encoded, enc_segments, enc_positions,
                                    decoder_segment_ids, decoder_positions, deterministic, logits)
        causal = cfg.architecture == "decoder"
        split = ops.sequence_split(cfg, tokens.shape[1], causal=causal, decode=self.decode)
        if split.order is not None:
            # Load balancing: the stack sees the tokens in split.order (each device holds an
            # early and a late chunk); positions and segments follow their tokens.
            segments, positions = input_defaults(tokens, segment_ids, positions)
            tokens, segment_ids, positions, token_types, prefix_mask = (
                None if a is None else a[:, split.order]
                for a in (tokens, segments, positions, token_types, prefix_mask))
        x, segments, positions, prefix_mask = self._inputs(
            tokens, segment_ids, positions, token_types, prefix_mask, deterministic)
        bias = self.relative_bias if cfg.position == "relative" else None
        ctx = self._context(segments, positions, causal, bias, prefix_mask, cfg.prompt_tokens,
                            split)
        stack = self.decoder if causal else self.encoder
        hidden = stack(x, ctx, deterministic)  # [b, prompt + t, d]
        if split.order is not None:  # back to the natural order for the heads and the loss
            inverse = np.argsort(split.order)
            hidden = constrain(hidden[:, inverse], ("batch", "length", "embed"))
            segments = segments[:, inverse]
        if cfg.prompt_tokens:
            hidden = hidden[:, cfg.prompt_tokens:]  # [b, t, d]
            segments = segments[:, cfg.prompt_tokens:]
        out = {"hidden": hidden}
        if causal and logits:
            out["logits"] = self.lm_logits(hidden)  # [b, t, vocab]
        out.update(self.heads(hidden, segments, self.embed, deterministic, pool_index))
        return out

    def encode(self, tokens: Array, segment_ids: Optional[Array] = None,
               positions: Optional[Array] = None, deterministic: bool = True):
        """Encoder half of an encoder-decoder: (hidden [b, s, d], segments, positions)."""
        x, segments, positions, _ = self._inputs(tokens, segment_ids, positions, None, None,
                                                 deterministic)
        ctx = self._context(segments, positions, False, self.encoder_bias,
                            visible=self.cfg.prompt_tokens)
        return self.encoder(x, ctx, deterministic), segments, positions

    def decode_step(self, decoder_tokens: Array, encoded: Array, encoder_segments: Array,
                    encoder_positions: Array, decoder_segment_ids: Optional[Array] = None,
                    decoder_positions: Optional[Array] = None,
                    deterministic: bool = True, logits: bool = True) -> dict[str, Array]:
        """Decoder half of an encoder-decoder: logits over the target vocabulary."""
        x, segments, positions, _ = self._inputs(decoder_tokens, decoder_segment_ids,
                                                 decoder_positions, None, None, deterministic,
                                                 prompt=False)
        ctx = self._context(segments, positions, True, self.decoder_bias)
        # Decoder tokens of packed document k attend to encoder tokens of document k.
        cross_mask = make_mask(segments, encoder_segments, causal=False,
                               visible=self.cfg.prompt_tokens)  # [b, 1, t, s]
        ctx = ctx.replace(encoded=encoded, cross_mask=cross_mask,
                          encoded_positions=encoder_positions)
        hidden = self.decoder(x, ctx, deterministic)  # [b, t, d]
        return {"hidden": hidden, **({"logits": self.lm_logits(hidden)} if logits else {})}

    def lm_logits(self, hidden: Array) -> Array:
        """The LM head on final hidden states [b, t, d] -> float32 logits [b, t, vocab]."""
        if self.cfg.tie_embeddings:
            logits = self.embed.attend(hidden)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        if self.cfg.logits_scale != 1.0:  # original T5 scales the decoder output before the head
            logits = logits * self.cfg.logits_scale
        return constrain(logits, ("batch", "length", "vocab"))

    def _inputs(self, tokens, segment_ids, positions, token_types, prefix_mask,
                deterministic, prompt=True):
        """The one input path of every stack: default segments and positions, token
        (+ position, + token type) embeddings, the soft prompt (encoder-decoders put it before
        the encoder only: `prompt=False` for the decoder), dropout.
        Returns (x [b, t', d], segments [b, t'], positions [b, t'], prefix_mask), with t' the
        length after the prompt."""
        segments, positions = input_defaults(tokens, segment_ids, positions)
        x = self.embed(tokens, positions, token_types)  # [b, t, d]
        if prompt:
            x, segments, positions, prefix_mask = self._prepend_prompt(x, segments, positions,
                                                                       prefix_mask)
        x = self.dropout(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        return x, segments, positions, prefix_mask

    def _context(self, segments, positions, causal, relative_bias=None, prefix_mask=None,
                 visible=0, split: Optional[ops.SequenceSplit] = None):
        """The self-attention Context of a stack: its mask (None while decoding with a KV
        cache, which masks by the cached segments; the first `visible` keys, a soft prompt,
        are seen by every token) and relative bias. A sequence split over the context axis
        (`split`) builds no [b, 1, t, t] mask: the context-parallel op masks by segments,
        original positions (`index`) and prefix, block by block."""
        cfg = self.cfg
        if split is not None and split.shards > 1:
            if relative_bias is not None or visible:  # config.check_context_parallel refuses these
                raise ValueError("context parallelism cannot add a relative bias or soft prompt")
            index = None if split.order is None else jnp.asarray(split.order, jnp.int32)
            return Context(positions=positions, segments=segments, prefix=prefix_mask,
                           index=index, context_parallel=True)
        decoding = self.decode and causal  # only decoder stacks hold a KV cache
        mask = None
        if not decoding:
            mask = make_mask(segments, segments, causal, prefix_mask, visible)  # [b, 1, t, t]
        bias = None
        if relative_bias is not None:
            keys = positions
            if decoding:  # against every cache slot: 0 .. max_len - 1
                keys = jnp.broadcast_to(jnp.arange(cfg.max_len)[None],
                                        (positions.shape[0], cfg.max_len))
            bias = relative_bias(positions, keys)  # [b, heads, t, s]
        return Context(positions=positions, segments=segments, mask=mask, bias=bias,
                       prefix=prefix_mask)

    def _prepend_prompt(self, x, segments, positions, prefix_mask):
        """Soft prompt: virtual tokens (segment -1) every real token may attend to."""
        n = self.cfg.prompt_tokens
        if not n:
            return x, segments, positions, prefix_mask
        b = x.shape[0]
        prompt = jnp.broadcast_to(self.prompt.astype(x.dtype), (b,) + self.prompt.shape)
        x = jnp.concatenate([prompt, x], axis=1)
        # Segment -1: the prompt sees itself; make_mask(visible=n) lets every token see it.
        segments = jnp.concatenate([jnp.full((b, n), -1, jnp.int32), segments], axis=1)
        positions = jnp.concatenate([jnp.zeros((b, n), jnp.int32), positions], axis=1)
        if prefix_mask is not None:
            prefix_mask = jnp.concatenate([jnp.ones((b, n), bool), prefix_mask], axis=1)
        return x, segments, positions, prefix_mask
