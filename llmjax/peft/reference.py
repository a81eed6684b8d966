"""The reference model of preference objectives (dpo), as a view of the train state.

`ReferencePlan` wraps a plan and adds `reference(trainable, frozen) -> params`, which the
train step applies (without gradients) beside the policy:

- "adapter": the base with the PEFT delta switched off, i.e. the plan's merge of the frozen
  base with no PEFT leaves. Nothing is stored: the reference reads the same frozen arrays
  the policy merges its delta into (no second copy of the weights). Needs every trained
  leaf to be a PEFT leaf whose method is a parameter transform (lora, ia3): a trained base
  leaf would move the reference with the policy.
- "copy": a frozen copy of the initial (merged) parameters, stored in the state's frozen
  tree under REFERENCE, so it is sharded like the model, checkpointed, and never trained.
  `ComposedPlan.merge` ignores that key, so the policy and every export never see it.
"""
from __future__ import annotations

import jax

from llmjax.config import ConfigError
from llmjax.tree import flatten_parts, unflatten_parts

REFERENCE = "_reference"  # key of the reference copy in TrainState.frozen (mode "copy")
TRANSFORM_METHODS = ("lora", "ia3")  # their delta vanishes when their leaves are left out


class ReferencePlan:
    """A plan (the Plan protocol, delegated) plus `reference(trainable, frozen)`."""

    def __init__(self, plan, mode: str):
        if mode not in ("adapter", "copy"):
            raise ConfigError(f"objective.reference={mode!r} is not 'adapter' or 'copy' (mode "
                              "'cached' needs no reference plan: llmjax/train/reference_cache.py)")
        if mode == "adapter":
            names = [m.name for m in getattr(plan, "methods", [])]
            if not names or names == ["full"] or any(n not in TRANSFORM_METHODS for n in names):
                raise ConfigError(
                    f"objective.reference=adapter uses the base without the PEFT delta, which "
                    f"needs peft.method in {list(TRANSFORM_METHODS)} (now {plan.cfg.method!r}); "
                    f"set peft.method=lora, or objective.reference=copy (a frozen copy of the "
                    f"initial parameters, twice the parameter memory)")
        self.plan, self.mode = plan, mode

    def __getattr__(self, name):
        return getattr(self.plan, name)

    def split(self, params, rng):
        trainable, frozen = self.plan.split(params, rng)
        if self.mode == "copy":
            # The initial merged parameters; `+ 0` is not needed: jit outputs are distinct
            # buffers, and the step never writes `frozen`.
            return trainable, {**frozen, REFERENCE: self.plan.merge(trainable, frozen)}
        stray = [p for p in flatten_parts(trainable) if not self.plan.owns(p)]
        if stray:
            raise ConfigError(
                f"objective.reference=adapter: base leaves train ({'/'.join(stray[0])} ...), so "
                f"the base would move with the policy; drop peft.trainable or set "
                f"objective.reference=copy")
        return trainable, frozen

    def reference(self, trainable, frozen):
        """The reference parameters (gradients stopped)."""
        if self.mode == "copy":
            return jax.lax.stop_gradient(frozen[REFERENCE])
        base = {k: v for k, v in frozen.items() if k != REFERENCE}
        return jax.lax.stop_gradient(self.plan.merge({}, base))

    def axes(self, path: tuple, shape: tuple):
        if path and path[0] == REFERENCE:  # the copy shards like the leaf it copies
            names = self.plan.names().get(path[1:])
            if names is not None and len(names) == len(shape):
                return names
            return self.plan.axes(path[1:], shape)
        return self.plan.axes(path, shape)


def without_reference(frozen):
    """`frozen` less the reference copy (for code that treats frozen as the base)."""
    if not isinstance(frozen, dict) or REFERENCE not in frozen:
        return frozen
    return unflatten_parts({p: v for p, v in flatten_parts(frozen).items() if p[0] != REFERENCE})
