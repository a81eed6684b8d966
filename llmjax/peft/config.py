"""The `peft:` config section: which parameter-efficient method, and its knobs."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; method 'full' trains every parameter."""

    method: str = "full"  # one name or several joined by '+' (e.g. lora+head)
    targets: str = ""  # regex over parameter paths (lora, freeze, ...); "" = method default
    trainable: str = ""  # regex of extra leaves kept trainable (e.g. heads)
    rank: int = 8  # lora
    alpha: float = 16.0  # lora: scale = alpha / rank (or alpha / sqrt(rank) with rslora)
    rslora: bool = False
    lora_dropout: float = 0.0
    num_virtual_tokens: int = 20  # prompt_tuning / prefix_tuning
    prompt_init: str = "vocab"  # prompt_tuning: vocab | random
    adapter_dim: int = 64  # adapters: bottleneck width

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"peft.rank={self.rank} must be positive")
        if self.num_virtual_tokens <= 0:
            raise ValueError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be positive")
        if self.adapter_dim <= 0:
            raise ValueError(f"peft.adapter_dim={self.adapter_dim} must be positive")
        if self.prompt_init not in ("vocab", "random"):
            raise ValueError(f"peft.prompt_init={self.prompt_init!r} must be 'vocab' or 'random'")
