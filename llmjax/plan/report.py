"""`llmjax plan --target` as text: memory per chip against HBM, FLOPs, the roofline's step
time and MFU, the collectives; the arithmetic estimate beside the compiler's figures."""
from __future__ import annotations

from llmjax.plan.aot import Plan

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
