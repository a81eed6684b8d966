"""The `peft:` config section: which parameter-efficient method(s), and their knobs."""
from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; method 'full' trains every parameter.

    `method` is one registered name or several joined by '+' (`lora+head`): the
    trainable set is the union of the methods' sets, their transforms apply in
    order. See llmjax/peft/plan.py for the registry and docs/peft.md for a table.
    """

    method: str = "full"
    # Regex (re.search) over '/'-joined parameter paths. lora: kernels to adapt (default
    # attention query/value); ia3: modules to scale (default attention key/value, mlp/wo);
    # freeze: leaves to freeze (required). "" = the method's default.
    targets: str = ""
    trainable: str = ""  # regex of extra leaves kept trainable (e.g. 'heads/|lm_head')
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: scale = alpha / rank (or alpha / sqrt(rank) with rslora)
    rslora: bool = False
    # LoRA dropout acts on the LoRA branch's input activations, which a weight-space
    # transform never sees: only 0.0 is accepted (use model.dropout instead).
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 20  # prompt_tuning / prefix_tuning
    prompt_init: str = "vocab"  # prompt_tuning: vocab (random rows of the embedding) | random
    adapter_dim: int = 64  # adapters: bottleneck width

    def methods(self) -> list[str]:
        return [m.strip() for m in self.method.split("+") if m.strip()]

    def validate(self) -> None:
        if not self.methods():
            raise ValueError("peft.method is empty: use 'full' or a method name such as 'lora'")
        if self.rank <= 0:
            raise ValueError(f"peft.rank={self.rank} must be positive")
        if self.alpha <= 0:
            raise ValueError(f"peft.alpha={self.alpha} must be positive")
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be positive")
        if self.adapter_dim <= 0:
            raise ValueError(f"peft.adapter_dim={self.adapter_dim} must be positive")
        if self.prompt_init not in ("vocab", "random"):
            raise ValueError(f"peft.prompt_init={self.prompt_init!r} must be 'vocab' or 'random'")
        if self.lora_dropout != 0.0:
            raise ValueError(
                f"peft.lora_dropout={self.lora_dropout}: llmjax applies LoRA as a weight-space "
                f"transform (W + scale * A B), which never sees the activations dropout would act "
                f"on; set peft.lora_dropout=0 and use model.dropout for regularisation")
        for key in ("targets", "trainable"):
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ValueError(f"peft.{key}={getattr(self, key)!r} is not a valid regex: {err}")
        from llmjax.peft.plan import METHODS, _load_methods  # registry lives with the plan
        _load_methods()
        for name in self.methods():
            if name not in METHODS:
                import difflib
                close = difflib.get_close_matches(name, list(METHODS), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"peft.method: unknown method {name!r}{hint}; "
                                 f"available: {', '.join(sorted(METHODS))}")
