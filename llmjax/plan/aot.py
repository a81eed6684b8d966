"""Compile llmjax's own train and eval steps for a Cloud TPU topology on any host.

libtpu (the `tpu` extra: jax[tpu]) describes a TPU slice without the hardware
(jax.experimental.topologies); an Experiment built on those devices gives the exact jitted
step `llmjax train` runs there (mesh, rules, remat, PEFT plan, attention kernel: the model
resolves auto/splash from the mesh's devices, llmjax/models/ops/platform.py), lowered from
ShapeDtypeStructs carrying the experiment's shardings and compiled by the TPU compiler.
Its memory_analysis() gives the bytes per chip; llmjax/plan/hlo.py the roofline.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import time
from pathlib import Path
from typing import Optional

from llmjax.config import Config
from llmjax.errors import ConfigError
from llmjax.plan import hlo
from llmjax.plan.decode import DecodePlan, plan_decode, resolve as resolve_decode
from llmjax.plan.topology import Target

INSTALL = "pip install 'llmjax[tpu]'"


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def require_libtpu() -> None:
    if not libtpu_available():
        raise ConfigError(f"compiling for a TPU target needs libtpu (the TPU compiler, no TPU "
                          f"needed): {INSTALL}; without it `llmjax plan CONFIG` (no --target) "
                          f"gives the arithmetic estimate")


def for_target(cfg: Config, target: Target) -> Config:
    """The config as it runs on `target`: --slices puts the data axis over DCN."""
    if target.slices > 1:
        if cfg.mesh.dcn_data not in (1, target.slices):
            raise ConfigError(f"mesh.dcn_data={cfg.mesh.dcn_data} but --slices {target.slices}; "
                              f"leave mesh.dcn_data at 1 or set it to {target.slices}")
        cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=target.slices))
    return cfg


def build_for(cfg: Config, target: Target, devices=None):
    """experiment.build on the target's devices; a mesh of the wrong size names both counts."""
    from llmjax.data.tokenizer import SpecialTokens
    from llmjax.train.experiment import build
    devices = devices if devices is not None else target.devices()
    try:
        return build(cfg, devices=devices, special=SpecialTokens())  # no tokenizer files read
    except ConfigError as err:
        if str(err).startswith("mesh:"):
            m = cfg.mesh
            raise ConfigError(f"{target.describe()} has {target.num_chips} chips but the mesh "
                              f"(data {m.data} x fsdp {m.fsdp} x context {m.context} x tensor "
                              f"{m.tensor} x dcn_data {m.dcn_data}) does not cover them: {err}"
                              ) from None
        raise


def batch_shapes(exp) -> dict[str, tuple[int, ...]]:
    """Global shapes of the batch arrays the data pipeline gives this objective (int32; dpo's
    cached reference scores float32: BATCH_FLOATS)."""
    from llmjax.data.pipeline import _assemble
    from llmjax.objectives.preference import CACHED as BATCH_FLOATS
    cfg = exp.config
    values = BATCH_FLOATS if getattr(exp.objective, "cached_reference", False) else ()
    kind = exp.objective.batch_kind
    target_len = cfg.objective.target_length if kind == "seq2seq" else 0
    max_segments = cfg.data.max_segments or max(1, cfg.train.seq_len // 8)
    rows = [[]] * cfg.train.batch_size
    return {k: v.shape for k, v in _assemble(kind, rows, cfg.train.seq_len,
                                              target_len or cfg.train.seq_len,
                                              max_segments, values).items()}


def shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of `tree` under `shardings` (same structure)."""
    import jax
    import numpy as np
    return sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
               for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


@dataclasses.dataclass
class Memory:
    """Bytes per chip."""

    params: int  # trainable + frozen parameters (arithmetic, from the shardings)
    optimizer: int  # optimizer state (arithmetic)
    other_state: int  # step counter and RNG key
    batch: int  # one global batch's share
    arguments: Optional[int] = None  # the compiler's argument bytes (= the four above)
    temporaries: Optional[int] = None  # activations, gradients, workspace
    outputs_not_aliased: Optional[int] = None  # outputs beyond the donated state (metrics)
    code: Optional[int] = None  # the program itself

    @property
    def arithmetic(self) -> int:
        return self.params + self.optimizer + self.other_state + self.batch

    @property
    def total(self) -> Optional[int]:
        if self.arguments is None:
            return None
        return self.arguments + self.temporaries + self.outputs_not_aliased + self.code


@dataclasses.dataclass
class StepPlan:
    """One compiled step on one target."""

    name: str  # train | eval
    compile_seconds: float
    memory: Memory
    compiler_flops: float  # cost_analysis()['flops'] (a while body counted once)
    roofline: hlo.Roofline
    attention_flops: float  # estimated FLOPs inside the splash kernel (custom calls)
    hlo_text: str = dataclasses.field(repr=False, default="")


@dataclasses.dataclass
class Plan:
    target: Target
    mesh: dict
    tokens_per_step: int
    model_flops: float  # per chip per step, the formula of llmjax.metrics (6N + attention)
    attention_impl: str  # what the model runs on the target
    memory: Memory  # arithmetic (always) + compiler figures of the train step (when compiled)
    steps: dict  # name -> StepPlan
    fits: bool
    shortfall: int  # bytes over HBM (> 0 when it does not fit), else the headroom as < 0
    note: str = ""  # why there was no compile (does not fit by arithmetic alone)
    compiled: bool = False  # the TPU compiler ran (it may have refused: out of HBM)
    decode: Optional["DecodePlan"] = None  # the KV-cache prefill + decode step, when asked
    decode_note: str = ""  # why the decode was not planned

    @property
    def train(self) -> Optional[StepPlan]:
        return self.steps.get("train")

    def times(self) -> dict:
        """Estimated seconds of the train step: compute (roofline), ICI and DCN collectives,
        and the step (collectives over ICI overlap compute; DCN's do not)."""
        chip = self.target.chip
        r = self.train.roofline
        compute = r.compute_seconds + self.train.attention_flops / chip.peak_flops
        ici = sum(c.wire_bytes * c.count for c in r.collectives if not c.cross_slice) / (
            chip.ici_bandwidth / 2)
        dcn = sum(c.wire_bytes * c.count for c in r.collectives if c.cross_slice) / \
            chip.dcn_bandwidth
        return {"compute": compute, "ici": ici, "dcn": dcn, "step": max(compute, ici) + dcn}

    @property
    def step_seconds(self) -> float:
        return self.times()["step"]

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_seconds * self.target.chip.peak_flops)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds


def _attention_flops(exp, impl: str, per_chip_rows: float) -> float:
    """FLOPs inside the splash kernel per chip and step (the compiler cannot see into it):
    QK^T and PV, 4 t^2 d per head forward, the half a causal mask skips skipped, backward
    twice the forward, a remat'ed forward once more."""
    if impl != "splash":
        return 0.0
    m = exp.model_config
    t = exp.config.train.seq_len
    heads = m.num_heads / exp.mesh.shape["tensor"]
    causal = 0.5 if m.architecture == "decoder" else 1.0
    # A context axis splits each row's queries: a chip computes 1/context of its attention.
    rows = per_chip_rows / exp.mesh.shape["context"]
    forward = 4.0 * t * t * m.dim_per_head * heads * causal * m.num_layers * rows
    return forward * (3.0 + (1.0 if m.remat != "none" else 0.0))


def _resolved_impl(exp) -> str:
    import jax
    from llmjax.models.ops import resolve_attention
    with jax.set_mesh(exp.mesh):
        return resolve_attention(exp.model_config)


# The TPU compiler's verdicts: "... HLO temporaries (22.12G) exceeds available HBM (15.75G)"
# and "Used 20.5G of 15.75G hbm".
_OOM = (re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", re.I),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.I))


def _oom_bytes(message: str) -> Optional[tuple[int, int]]:
    """(bytes needed, bytes available) from the compiler's out-of-memory message."""
    m = _OOM[0].search(message) or _OOM[1].search(message)
    if not m:
        return None
    unit = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
    return (int(float(m.group(1)) * unit[m.group(2).upper()]),
            int(float(m.group(3)) * unit[m.group(4).upper()]))


def plan(cfg: Config, target: Target, steps=("train", "eval"), save_hlo: Optional[str] = None,
         devices=None, decode: Optional[dict] = None) -> Plan:
    """Build, lower and compile `steps` for `target` (only the arithmetic when the state
    alone cannot fit: no compile is needed to say so); with `decode` (plan_decode's keyword
    arguments: batch, context, prompt) also the KV-cache prefill and decode step."""
    note = []

    def check_decode(exp):  # before any compile: a wrong option fails fast
        try:
            resolve_decode(exp, **decode)
        except ConfigError as err:
            if any(v is not None for v in decode.values()):
                raise  # the decode options given do not fit this model
            note.append(str(err))  # the defaults do not: the train plan stands
    result, exp = _plan_steps(cfg, target, steps, save_hlo, devices,
                              check_decode if decode is not None else None)
    result.decode_note = " ".join(note)
    if decode is not None and not note:
        result.decode = plan_decode(exp, target, **decode)
        if save_hlo and result.decode is not None:
            for name in ("prefill", "step"):
                Path(save_hlo).mkdir(parents=True, exist_ok=True)
                (Path(save_hlo) / f"decode_{name}.{target.topology_name.replace(':', '_')}"
                 f".hlo.txt").write_text(getattr(result.decode, name).hlo_text)
    return result


def _plan_steps(cfg: Config, target: Target, steps, save_hlo, devices, check=None):
    import jax
    import jax.numpy as jnp
    from llmjax.metrics import flops_per_token
    from llmjax.models import param_count
    require_libtpu()
    cfg = for_target(cfg, target)
    exp = build_for(cfg, target, devices)
    if check is not None:
        check(exp)
    abstract = exp.abstract_state()
    state_sh = exp.state_shardings(abstract)
    shapes = batch_shapes(exp)
    batch_sh = exp.batch_shardings(list(shapes))
    from llmjax.objectives.preference import CACHED as BATCH_FLOATS
    batch = {k: jax.ShapeDtypeStruct(s, jnp.float32 if k in BATCH_FLOATS else jnp.int32,
                                     sharding=batch_sh[k]) for k, s in shapes.items()}
    memory = Memory(
        params=shard_bytes((abstract.params, abstract.frozen), (state_sh.params, state_sh.frozen)),
        optimizer=shard_bytes(abstract.opt_state, state_sh.opt_state),
        other_state=shard_bytes((abstract.step, abstract.rng), (state_sh.step, state_sh.rng)),
        batch=shard_bytes(batch, batch_sh))
    chips = target.num_chips
    n_params = param_count({"params": abstract.params, "frozen": abstract.frozen})
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = flops_per_token(exp.model_config, n_params, cfg.train.seq_len,
                                  cfg.objective.target_length or None) * tokens / chips
    impl = _resolved_impl(exp)
    hbm = target.chip.hbm_bytes
    result = Plan(target, dict(exp.mesh.shape), tokens, model_flops, impl, memory, {},
                  True, memory.arithmetic - hbm)
    if memory.arithmetic > hbm:  # the state alone is too big: say so without compiling
        result.fits = False
        result.note = "parameters + optimizer state + batch alone exceed HBM (not compiled)"
        return result, exp
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, state_sh)
    from llmjax.parallel import batch_shards  # data * fsdp * expert
    rows = cfg.train.batch_size / batch_shards(exp.mesh)
    for name in steps:
        fn = (exp.train_step if name == "train" else exp.eval_step)(list(shapes), state_sh)
        begin = time.perf_counter()
        # No persistent cache: a TPU executable compiled from a topology cannot be loaded
        # back on this host (jax warns and compiles again), so writing it is wasted time.
        # (jax decides once per process: this holds when the plan compiles first, as in
        # `llmjax plan`.)
        cache = jax.config.jax_enable_compilation_cache
        jax.config.update("jax_enable_compilation_cache", False)
        result.compiled = True
        try:
            compiled = fn.lower(state, batch).compile()
        except Exception as err:  # noqa: BLE001 - the TPU compiler's out-of-memory verdict
            used = _oom_bytes(str(err))
            if used is None or "RESOURCE_EXHAUSTED" not in str(err):
                raise
            result.fits = False
            result.shortfall = used[0] - used[1]
            result.note = (f"the TPU compiler ran out of HBM compiling the {name} step: "
                           f"{' '.join(str(err).split())[:300]}")
            return result, exp
        finally:
            jax.config.update("jax_enable_compilation_cache", cache)
        seconds = time.perf_counter() - begin
        text = compiled.as_text()
        mem = compiled.memory_analysis()
        step_memory = dataclasses.replace(
            memory, arguments=mem.argument_size_in_bytes, temporaries=mem.temp_size_in_bytes,
            outputs_not_aliased=max(0, mem.output_size_in_bytes - mem.alias_size_in_bytes),
            code=mem.generated_code_size_in_bytes)
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        slice_of = [getattr(d, "slice_index", 0) or 0 for d in exp.mesh.devices.flat]
        roof = hlo.analyze(text, target.chip.peak_flops, target.chip.hbm_bandwidth, slice_of)
        uses_kernel = "tpu_custom_call" in roof.custom_calls
        attn = _attention_flops(exp, impl if uses_kernel else "xla", rows)
        if name == "eval":
            attn /= 3.0 + (1.0 if exp.model_config.remat != "none" else 0.0)
        result.steps[name] = StepPlan(name, seconds, step_memory, float(cost.get("flops", 0.0)),
                                      roof, attn, text)
        if save_hlo:
            out = Path(save_hlo)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}_step.{target.topology_name.replace(':', '_')}.hlo.txt").write_text(text)
    train = result.train
    if train is not None:
        result.memory = train.memory
        used = max(s.memory.total for s in result.steps.values())
        result.shortfall = used - hbm
        result.fits = used <= hbm
    return result, exp
