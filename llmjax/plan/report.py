"""`llmjax plan --target` as text: memory per chip against HBM, FLOPs, the roofline's step
time and MFU, the collectives; the arithmetic estimate beside the compiler's figures."""
from __future__ import annotations

from llmjax.plan.aot import Plan
from llmjax.plan.decode import DecodePlan

MiB = 2 ** 20


def _mib(n) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def format_plan(p: Plan) -> str:
    t = p.target
    m = p.memory
    lines = [f"target {t.describe()}; mesh {p.mesh}; attention {p.attention_impl}",
             "memory per chip            arithmetic        compiler"]
    rows = [("parameters", m.params, None), ("optimizer state", m.optimizer, None),
            ("step + rng", m.other_state, None), ("batch", m.batch, None),
            ("arguments (sum)", m.arithmetic, m.arguments),
            ("temporaries", None, m.temporaries),
            ("outputs not donated", None, m.outputs_not_aliased), ("program", None, m.code)]
    for name, a, c in rows:
        lines.append(f"  {name:24s} {_mib(a):>16s}  {_mib(c):>14s}")
    hbm = t.chip.hbm_bytes
    total = max((s.memory.total for s in p.steps.values()), default=None)
    verdict = (f"fits, {-p.shortfall / MiB:,.1f} MiB to spare" if p.fits else
               f"DOES NOT FIT: {p.shortfall / MiB:,.1f} MiB over")
    lines.append(f"  {'total (largest step)':24s} {'':>16s}  {_mib(total):>14s}   of "
                 f"{hbm / MiB:,.0f} MiB HBM: {verdict}")
    if p.note:
        lines.append(f"  ({p.note})")
    for name, s in p.steps.items():
        lines.append(f"{name} step: compiled in {s.compile_seconds:.1f} s; "
                     f"total {_mib(s.memory.total)}")
    if p.decode is not None:
        lines += format_decode(p.decode, t.chip.hbm_bytes)
    elif p.decode_note:
        lines.append(f"decode: not planned ({p.decode_note})")
    if p.train is None:
        return "\n".join(lines)
    s = p.train
    r = s.roofline
    tm = p.times()
    lines += [
        "train step per chip",
        f"  model FLOPs (6N + attention formula)   {p.model_flops / 1e9:14,.1f} GFLOP",
        f"  matmul FLOPs in the compiled HLO       {r.flops / 1e9:14,.1f} GFLOP"
        f"  (+ {s.attention_flops / 1e9:,.1f} GFLOP estimated inside the attention kernel)",
        f"  compiler's cost_analysis flops         {s.compiler_flops / 1e9:14,.1f} GFLOP"
        f"  (a loop body counted once)",
        f"  HBM bytes read + written               {r.hbm_bytes / 1e9:14,.2f} GB",
        f"  roofline compute time                  {tm['compute'] * 1e3:14,.2f} ms"
        f"  ({r.bytes_bound_seconds / max(tm['compute'], 1e-30) * 100:.0f}% in ops bound by HBM "
        f"bandwidth)",
        f"  collectives over ICI / DCN             {tm['ici'] * 1e3:14,.2f} ms / "
        f"{tm['dcn'] * 1e3:,.2f} ms",
        f"  estimated step time                    {tm['step'] * 1e3:14,.2f} ms"
        f"  (max(compute, ICI) + DCN)",
        f"  estimated MFU                          {p.mfu * 100:14.1f} %  "
        f"({p.tokens_per_second:,.0f} tokens/s for the slice)",
        "collectives (kind, devices per group, count per step, MiB each, link)"]
    for c in r.collectives[:12]:
        link = "DCN" if c.cross_slice else "ICI"
        lines.append(f"  {c.kind:20s} {c.group:5d} {c.count:7d} x {c.bytes / MiB:10.3f} MiB  "
                     f"{link}")
    if len(r.collectives) > 12:
        lines.append(f"  ... {len(r.collectives) - 12} more")
    lines.append("Estimates from the compiled program (roofline), not measurements.")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:14,.3f} ms"


def format_decode(d: DecodePlan, hbm: int) -> list[str]:
    """The KV-cache decode: bytes per chip, prefill time, per-token latency, tokens/s."""
    used = max(d.prefill.total, d.step.total)
    verdict = "fits" if used <= hbm else f"DOES NOT FIT: {(used - hbm) / MiB:,.1f} MiB over"
    r = d.step.roofline
    return [
        f"decode (KV cache; batch {d.batch}, context {d.context} tokens, prompt {d.prompt}): "
        f"prefill compiled in {d.prefill.compile_seconds:.1f} s, step in "
        f"{d.step.compile_seconds:.1f} s",
        f"  per chip: parameters {_mib(d.param_bytes)} (compute dtype), KV cache "
        f"{_mib(d.cache_bytes)}; largest total {_mib(used)} of {hbm / MiB:,.0f} MiB HBM: "
        f"{verdict}",
        f"  {f'prefill ({d.batch} x {d.prompt} tokens)':38s} {_ms(d.prefill_seconds)}"
        f"  (time to the first token)",
        f"  decode step: roofline                  {_ms(r.compute_seconds)}"
        f"  ({r.bytes_bound_seconds / max(r.compute_seconds, 1e-30) * 100:.0f}% in ops bound "
        f"by HBM bandwidth)",
        f"  decode step: collectives over ICI      {_ms(d.ici_seconds)}  (not overlapped)",
        f"  estimated per-token latency            {_ms(d.token_seconds)}"
        f"  ({d.tokens_per_second:,.0f} tokens/s for the slice, "
        f"{1 / d.token_seconds:,.1f} per sequence)",
        f"  {'HBM floor (params + cache read once)':38s} {_ms(d.floor_seconds)}"
        f"  (a step cannot be faster; {d.floor_seconds / d.token_seconds * 100:.0f}% of the "
        f"estimate)"]
