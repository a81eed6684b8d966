"""The KV-cache decode of `llmjax generate` compiled for a TPU target: prefill and one
decode step, with generate.py's own jitted pieces on the experiment's mesh (rows over the
batch axes, the cache's key/value heads over `tensor`, parameters in the training layout),
and what they imply for serving: cache and parameter bytes per chip, the per-token latency
and tokens/s at a given batch and context.

Decoding one token reads every parameter and the whole cache once while doing ~2 FLOPs per
parameter per row: at small batches it is bound by HBM bandwidth, so next to the roofline
of the compiled step the report gives the floor (parameter + cache bytes per chip) / HBM
bandwidth. Collectives in a decode step are small and latency-bound: they are added to the
compute time, not overlapped with it.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

from llmjax.errors import ConfigError
from llmjax.plan import hlo


@dataclasses.dataclass
class Part:
    """One compiled piece (prefill or step): its roofline and the compiler's bytes."""

    compile_seconds: float
    roofline: hlo.Roofline
    arguments: int
    temporaries: int
    outputs_not_aliased: int
    code: int
    hlo_text: str = dataclasses.field(repr=False, default="")

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries + self.outputs_not_aliased + self.code


@dataclasses.dataclass
class DecodePlan:
    batch: int  # sequences decoded together (global)
    context: int  # KV-cache length: prompt + generated tokens
    prompt: int  # prefill length
    param_bytes: int  # per chip, in the compute dtype
    cache_bytes: int  # per chip, the whole cache (all layers)
    prefill: Part
    step: Part
    peak_flops: float
    hbm_bandwidth: float
    ici_bandwidth: float  # bidirectional, per chip

    def _seconds(self, part: Part) -> float:
        r = part.roofline
        ici = sum(c.wire_bytes * c.count for c in r.collectives) / (self.ici_bandwidth / 2)
        return r.compute_seconds + ici

    @property
    def token_seconds(self) -> float:
        """Estimated time of one decode step (one new token for every row)."""
        return self._seconds(self.step)

    @property
    def floor_seconds(self) -> float:
        """Reading the parameters and the cache once at the chip's HBM bandwidth."""
        return (self.param_bytes + self.cache_bytes) / self.hbm_bandwidth

    @property
    def prefill_seconds(self) -> float:
        return self._seconds(self.prefill)

    @property
    def tokens_per_second(self) -> float:
        return self.batch / self.token_seconds

    @property
    def ici_seconds(self) -> float:
        return self.token_seconds - self.step.roofline.compute_seconds


def _memory(compiled):
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes, m.temp_size_in_bytes,
            max(0, m.output_size_in_bytes - m.alias_size_in_bytes),
            m.generated_code_size_in_bytes)


def resolve(exp, batch: Optional[int] = None, context: Optional[int] = None,
            prompt: Optional[int] = None) -> tuple[int, int, int]:
    """(batch, context, prompt) with the defaults filled in, or a ConfigError naming the
    option that does not fit the model or the mesh (checked before anything compiles)."""
    from llmjax.parallel import batch_shards
    cfg = exp.model_config
    if cfg.architecture == "encoder":
        raise ConfigError(f"{cfg.family} is encoder-only: it has no KV-cache decode "
                          f"(leave out the decode options)")
    shards = batch_shards(exp.mesh)
    batch = batch or shards
    context = context or exp.config.train.seq_len
    if batch % shards:
        raise ConfigError(f"--decode-batch {batch} must be a multiple of the mesh's batch "
                          f"shards ({shards}: rows are split over them)")
    encoder = cfg.architecture == "encoder_decoder"
    prompt = prompt or max(1, context // 2)
    if not encoder and not 0 < prompt < context:
        raise ConfigError(f"--decode-prompt {prompt} must be between 1 and --decode-len "
                          f"{context} - 1 (the cache holds prompt + generated tokens)")
    if context > cfg.max_len or (encoder and cfg.position == "learned" and prompt > cfg.max_len):
        raise ConfigError(f"--decode-len {context} (or --decode-prompt {prompt}) exceeds "
                          f"model.max_len={cfg.max_len}; lower it or raise model.max_len")
    return batch, context, prompt


def plan_decode(exp, target, batch: Optional[int] = None, context: Optional[int] = None,
                prompt: Optional[int] = None) -> DecodePlan:
    """Compile prefill (`prompt` tokens) and one decode step (a `context`-token cache) of
    `batch` rows for the experiment's mesh. Defaults: one row per batch shard, the train
    sequence length as context, half of it as the prompt."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from llmjax import generate
    from llmjax.models.api import abstract_params
    from llmjax.parallel import batch_sharding, param_shardings
    from llmjax.plan.aot import shard_bytes
    cfg = exp.model_config
    mesh, rules = exp.mesh, exp.rules
    batch, context, prompt = resolve(exp, batch, context, prompt)
    encoder = cfg.architecture == "encoder_decoder"
    # Serving weights in the compute dtype (a checkpoint's fp32 master weights cast once).
    dcfg = generate._decode_config(dataclasses.replace(cfg, param_dtype=cfg.dtype), context)
    program = generate._Program(dcfg, 0.0, 0, 1.0, mesh, rules)
    boxed = abstract_params(dcfg)
    params_sh = param_shardings(boxed, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(dcfg, boxed=False), params_sh)
    rows = batch_sharding(mesh)
    ids = lambda n: jax.ShapeDtypeStruct((batch, n), jnp.int32, sharding=rows)  # noqa: E731
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
    parts = {}
    cache_jax = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # see aot.plan
    try:
        with program.context():
            args = (params, ids(prompt), ids(prompt), ids(prompt), rng)
            token, cache, pos, ctx = jax.eval_shape(program.start, *args)
            cache_sh = generate.cache_shardings(cache, mesh, rules)
            cache = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                 cache, cache_sh)
            on_rows = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows)  # noqa
            step_args = (params, cache, on_rows(token), on_rows(pos),
                         jax.tree.map(on_rows, ctx), rng)
            for name, fn, a in (("prefill", program.start, args),
                                ("step", program.step, step_args)):
                begin = time.perf_counter()
                compiled = fn.lower(*a).compile()
                seconds = time.perf_counter() - begin
                text = compiled.as_text()
                slice_of = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
                roof = hlo.analyze(text, target.chip.peak_flops, target.chip.hbm_bandwidth,
                                   slice_of)
                parts[name] = Part(seconds, roof, *_memory(compiled), text)
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_jax)
    chip = target.chip
    # The cache as compiled: rounded up to 16 positions, or model.max_len (learned positions).
    return DecodePlan(batch, dcfg.max_len, prompt, shard_bytes(params, params_sh),
                      shard_bytes(cache, cache_sh), parts["prefill"], parts["step"],
                      chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth)
