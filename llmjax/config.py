"""Typed configuration: one dataclass per section, YAML files, dotted overrides.

Every section is defined here (llmjax.data.config and llmjax.peft.config re-export theirs), and
this module imports nothing else of llmjax but llmjax.errors: the config layer is a leaf. Checks
that need a kernel or a registry run where the thing is built (PEFT method names in
llmjax.peft.plan.check, objective names in llmjax.objectives).

A config is built from (in order) dataclass defaults, a YAML file, and
`section.key=value` overrides from the command line. Unknown keys, wrong types
and impossible combinations raise `ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from llmjax.errors import ConfigError  # defined there: llmjax.errors is the one lower module


ARCHITECTURES = ("decoder", "encoder", "encoder_decoder")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")
ROPE_SCALINGS = ("none", "linear", "dynamic", "llama3", "yarn")  # model.rope_scaling (HF rope_type)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every knob of the one Transformer implementation (see models/transformer.py).

    Frozen: derive a changed copy with dataclasses.replace."""

    family: str = "gpt"  # label: gpt | bert | t5 | palm | llama (display, conversion)
    architecture: str = "decoder"  # decoder | encoder | encoder_decoder
    vocab_size: int = 32000  # token ids (>= the tokenizer's vocabulary, special tokens included)
    d_model: int = 512  # width of the residual stream (embedding size)
    num_layers: int = 6  # encoder layers, or decoder layers of a decoder-only model
    num_decoder_layers: Optional[int] = None  # encoder_decoder only; default num_layers
    num_heads: int = 8  # attention (query) heads
    num_kv_heads: Optional[int] = None  # None: = num_heads (MHA); 1: MQA; else GQA
    head_dim: Optional[int] = None  # None: d_model // num_heads
    d_ff: int = 2048  # hidden width of the MLP
    max_len: int = 512  # longest sequence (learned positions, RoPE table, KV cache)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    norm_position: str = "pre"  # pre (GPT, T5, LLaMA) | post (BERT)
    embed_norm: bool = False  # LayerNorm on the embeddings (BERT)
    final_norm: bool = True  # norm after the last layer (pre-LN models)
    activation: str = "gelu"  # gelu (tanh approx.) | gelu_exact | relu | silu
    gated_mlp: bool = False  # GLU variants: SwiGLU (silu), GeGLU (gelu)
    parallel_block: bool = False  # PaLM: x + attn(norm(x)) + mlp(norm(x))
    position: str = "learned"  # learned | rope | relative | none
    rope_theta: float = 10000.0  # RoPE base frequency (position=rope)
    # RoPE frequency scaling for long context, as HF's `rope_scaling` (docs/long-context.md):
    # linear = positions / factor; dynamic = NTK, the base grows with the longest position of
    # each forward call beyond rope_original_max_len; llama3 = Llama 3.1 frequency bands;
    # yarn = YaRN (NTK-by-parts ramp between beta_fast and beta_slow, plus attention factor).
    rope_scaling: str = "none"  # none | linear | dynamic | llama3 | yarn
    rope_scaling_factor: float = 1.0  # HF `factor`: how far the context is stretched (>= 1)
    # HF `original_max_position_embeddings` (llama3) or `max_position_embeddings` (dynamic):
    # the length the model was pretrained at; None: model.max_len.
    rope_original_max_len: Optional[int] = None
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original/high are kept as they are
    rope_yarn_beta_fast: float = 32.0  # yarn: rotations over the original length above which a frequency is kept
    rope_yarn_beta_slow: float = 1.0  # yarn: rotations below which a frequency is divided by factor
    # yarn: multiplies RoPE's cos and sin (HF attention_factor); None: 0.1 * ln(factor) + 1.
    rope_attention_factor: Optional[float] = None
    relative_buckets: int = 32  # T5 relative position buckets (position=relative)
    relative_max_distance: int = 128  # T5: distances beyond this share the last bucket
    scale_attention: bool = True  # divide QK^T by sqrt(d_k); T5 folds it into init
    use_bias: bool = True  # biases in dense layers and norms
    tie_embeddings: bool = True  # LM head reuses the token embedding
    logits_scale: float = 1.0  # multiplies the LM logits (original T5, tied: d_model ** -0.5)
    num_token_types: int = 0  # BERT segment (token type) embeddings
    pooler: bool = False  # BERT [CLS] pooler
    mlm_head: bool = False  # BERT MLM head: transform + norm + tied decoder + bias
    nsp_head: bool = False  # BERT next-sentence head (on the pooler)
    num_labels: int = 0  # classification head on the pooled output (0: none)
    dropout: float = 0.0  # hidden dropout: embeddings, attention output, MLP output (+ inside T5's MLP)
    attention_dropout: float = 0.0  # dropout on the attention probabilities (HF attention_probs_dropout_prob)
    initializer_range: float = 0.02  # std of the normal initialiser of kernels and embeddings
    dtype: str = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: str = "float32"  # master weights
    scan_layers: bool = True  # nn.scan over layers: constant compile time
    remat: str = "none"  # none | full | dots | dots_no_batch
    # xla | cudnn (jax.nn.dot_product_attention, GPU) | splash (Pallas, TPU) | auto
    attention_impl: str = "xla"
    # Backend-specific kernels (llmjax/models/ops/): auto = cpu_custom_vjp on the
    # CPU backend (explicit backward matmuls XLA:CPU runs faster), xla (plain jnp) elsewhere.
    kernels: str = "auto"  # auto | xla | cpu_custom_vjp
    # Declared hooks for parameter-efficient methods (set by llmjax.peft, 0 = off).
    prompt_tokens: int = 0  # soft prompt prepended to the input embeddings
    prefix_tokens: int = 0  # per-layer learned key/value prefixes
    adapter_dim: int = 0  # bottleneck adapters after attention and MLP
    # RMS/LayerNorm on queries and keys before RoPE: head = over each head's features
    # (Qwen3), full = over all query (key) features (OLMoE).
    qk_norm: str = "none"  # none | head | full
    qkv_bias: bool = False  # biases on the query/key/value projections even when use_bias is off (Qwen2)
    # Mixture of experts (llmjax/models/moe.py, docs/moe.md); num_experts 0 = dense MLPs.
    num_experts: int = 0  # routed SwiGLU experts per MoE layer (0: every MLP is dense)
    experts_per_token: int = 2  # top-k experts each token is sent to
    expert_d_ff: Optional[int] = None  # hidden width of each expert; None: d_ff
    moe_renormalize: bool = True  # rescale the top-k router weights to sum to 1 (Mixtral)
    moe_shared_d_ff: int = 0  # shared expert hidden width, gated by sigmoid(x w) (Qwen2-MoE); 0: none
    moe_every: int = 1  # MoE on layers k-1, 2k-1, ... (every k-th layer); the others dense
    moe_impl: str = "dropless"  # dropless (sort + ragged_dot) | dense (capacity dispatch/combine)
    capacity_factor: float = 1.25  # dense: expert slots per row = ceil(cf * length * k / E)
    router_balance_weight: float = 0.01  # objective weight of the Switch load-balancing loss
    router_z_weight: float = 0.001  # objective weight of the router z-loss (logsumexp^2)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def expert_hidden(self) -> int:
        return self.expert_d_ff or self.d_ff

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) has an MoE MLP: every moe_every-th layer, the last of each group."""
        return self.num_experts > 0 and (i + 1) % self.moe_every == 0

    def validate(self) -> None:
        _choice("model.architecture", self.architecture, ARCHITECTURES)
        _choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("model.norm_position", self.norm_position, ("pre", "post"))
        _choice("model.activation", self.activation, ("gelu", "gelu_exact", "relu", "silu"))
        _choice("model.position", self.position, ("learned", "rope", "relative", "none"))
        _choice("model.remat", self.remat, REMAT_POLICIES)
        _choice("model.dtype", self.dtype, DTYPES)
        _choice("model.param_dtype", self.param_dtype, DTYPES)
        _choice("model.attention_impl", self.attention_impl, ("xla", "cudnn", "splash", "auto"))
        _choice("model.kernels", self.kernels, ("auto", "xla", "cpu_custom_vjp"))
        _choice("model.qk_norm", self.qk_norm, ("none", "head", "full"))
        for key in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        for key in ("num_kv_heads", "head_dim", "num_decoder_layers"):  # optional sizes
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive "
                                  f"(or null for the default)")
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}: "
                f"choose num_heads among {_divisors(self.d_model)} or set model.head_dim")
        if self.num_heads % self.kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
                f"{self.num_heads}: choose num_kv_heads among {_divisors(self.num_heads)}")
        if self.position == "rope" and self.dim_per_head % 2:
            raise ConfigError(f"model.position=rope needs an even head dimension, got {self.dim_per_head}")
        self._validate_rope_scaling()
        if self.position == "relative" and self.relative_buckets < 2:
            raise ConfigError("model.relative_buckets must be >= 2 for model.position=relative")
        if self.architecture != "encoder" and (self.pooler or self.mlm_head or self.nsp_head):
            raise ConfigError("model.pooler/mlm_head/nsp_head are encoder heads: "
                              "set model.architecture=encoder or turn them off")
        if (self.nsp_head or self.num_labels) and not self.pooler and self.architecture == "encoder":
            raise ConfigError("model.nsp_head and model.num_labels read the pooled [CLS] vector: "
                              "set model.pooler=true")
        if self.num_decoder_layers is not None and self.architecture != "encoder_decoder":
            raise ConfigError("model.num_decoder_layers is only for architecture=encoder_decoder")
        if self.parallel_block and self.norm_position == "post":
            raise ConfigError("model.parallel_block needs model.norm_position=pre")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"model.attention_dropout={self.attention_dropout} must be in [0, 1)")
        if self.attention_impl == "cudnn" and self.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"model.attention_impl=cudnn runs in bfloat16 or float16, not "
                              f"model.dtype={self.dtype}: set model.dtype=bfloat16, or "
                              f"attention_impl=auto (cuDNN where it applies, XLA elsewhere)")
        if self.num_experts:
            self._validate_moe()
        if self.attention_impl == "splash" and (reason := splash_unsupported(self)):
            raise ConfigError(f"model.attention_impl=splash cannot run this model: {reason}; "
                              f"use model.attention_impl=auto or xla")


    @property
    def rope_original_len(self) -> int:
        """The pretraining length RoPE scaling is measured against."""
        return self.rope_original_max_len or self.max_len

    def _validate_rope_scaling(self) -> None:
        _choice("model.rope_scaling", self.rope_scaling, ROPE_SCALINGS)
        if self.rope_scaling == "none":
            return
        if self.position != "rope":
            raise ConfigError(f"model.rope_scaling={self.rope_scaling} scales rotary positions, "
                              f"but model.position={self.position}: set model.position=rope or "
                              f"model.rope_scaling=none")
        if not self.rope_scaling_factor >= 1.0:  # also catches NaN
            raise ConfigError(f"model.rope_scaling_factor={self.rope_scaling_factor} must be >= 1 "
                              f"(the context stretch, e.g. 8 for Llama 3.1)")
        if self.rope_original_max_len is not None and self.rope_original_max_len <= 0:
            raise ConfigError(f"model.rope_original_max_len={self.rope_original_max_len} must be "
                              f"positive (or null for model.max_len)")
        if self.rope_scaling == "llama3" and not (
                0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
            raise ConfigError(f"model.rope_low_freq_factor={self.rope_low_freq_factor} and "
                              f"model.rope_high_freq_factor={self.rope_high_freq_factor}: llama3 "
                              f"needs 0 < low < high (Llama 3.1: 1 and 4)")
        if self.rope_scaling == "yarn" and not self.rope_yarn_beta_fast > self.rope_yarn_beta_slow > 0:
            raise ConfigError(f"model.rope_yarn_beta_fast={self.rope_yarn_beta_fast} and "
                              f"model.rope_yarn_beta_slow={self.rope_yarn_beta_slow}: yarn needs "
                              f"beta_fast > beta_slow > 0 (defaults 32 and 1)")
        if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
            raise ConfigError(f"model.rope_attention_factor={self.rope_attention_factor} must be "
                              f"> 0 (or null: 0.1 * ln(factor) + 1 for yarn)")
        if self.rope_scaling == "dynamic" and self.dim_per_head <= 2:
            raise ConfigError(f"model.rope_scaling=dynamic needs a head dimension > 2, got "
                              f"{self.dim_per_head}")

    def _validate_moe(self) -> None:
        _choice("model.moe_impl", self.moe_impl, ("dropless", "dense"))
        if self.num_experts < 0:
            raise ConfigError(f"model.num_experts={self.num_experts} must be >= 0 (0: dense)")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"model.experts_per_token={self.experts_per_token} must be between 1 and "
                f"model.num_experts={self.num_experts}")
        if self.capacity_factor <= 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor} must be > 0 "
                              f"(1.0: slots for a perfectly balanced load; 1.25 is usual)")
        for key in ("expert_d_ff", "moe_every"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be positive")
        if self.moe_shared_d_ff < 0:
            raise ConfigError(f"model.moe_shared_d_ff={self.moe_shared_d_ff} must be >= 0")
        if self.moe_every > 1 and self.scan_layers:
            raise ConfigError(f"model.moe_every={self.moe_every} mixes dense and MoE layers, "
                              f"which nn.scan cannot stack: set model.scan_layers=false")
        if self.architecture != "decoder":
            raise ConfigError("model.num_experts: MoE MLPs are implemented for "
                              "architecture=decoder only")


def splash_unsupported(cfg: ModelConfig) -> Optional[str]:
    """Why this model's attention cannot run on the Pallas splash kernel (None: it can).

    The kernel's limits stated as config arithmetic, so validation needs no kernel import;
    llmjax.models.ops.splash (unsupported, check) uses this list."""
    if cfg.position == "relative" or cfg.architecture == "encoder_decoder":
        return "it adds a relative position bias to the scores (T5)"
    if cfg.prompt_tokens:
        return "prompt tuning's soft prompt is visible to every token (not a segment mask)"
    if cfg.prefix_tokens:
        return "prefix tuning prepends learned keys/values every query sees"
    return None


@dataclasses.dataclass
class MeshConfig:
    """Device mesh: sizes per axis, -1 = the rest of the devices."""

    data: int = -1  # data-parallel axis size (batch split, parameters replicated)
    fsdp: int = 1  # fully sharded data-parallel axis (batch and parameters split)
    tensor: int = 1  # tensor-parallel axis (heads and MLP width split)
    expert: int = 1  # expert-parallel axis (MoE experts split; the batch too, outside experts)
    dcn_data: int = 1  # data parallelism across slices (multi-slice TPU)
    # Ordered logical-axis rules: [logical name, mesh axis or list of axes or null].
    # Empty = llmjax.parallel.DEFAULT_RULES.
    rules: list = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor,
                 "expert": self.expert}
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (the rest), got {sizes}")
        for key, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"mesh.{key}={size} must be a positive size or -1")
        if self.dcn_data < 1:
            raise ConfigError(f"mesh.dcn_data={self.dcn_data} must be >= 1")


@dataclasses.dataclass
class ObjectiveConfig:
    """Pretraining / fine-tuning objective(s), looked up in llmjax.objectives."""

    name: str = "clm"  # one name, or several joined by '+' (e.g. mlm+nsp)
    weights: list = dataclasses.field(default_factory=list)  # per objective; default 1.0 each
    mask_rate: float = 0.15  # mlm
    mask_token_rate: float = 0.8  # mlm: of the chosen, replaced by [MASK]
    random_token_rate: float = 0.1  # mlm: of the chosen, replaced by a random token
    noise_density: float = 0.15  # span_corruption
    mean_span_length: float = 3.0  # span_corruption
    prefix_fraction: float = 0.5  # prefix_lm: max prefix as a fraction of each row
    target_length: int = 0  # span_corruption / seq2seq decoder length (0: derived)
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM uses 1e-4)
    label_smoothing: float = 0.0  # share of target probability spread over the vocabulary
    beta: float = 0.1  # dpo/simpo: scale of the implicit reward; orpo: weight of the odds-ratio term
    dpo_label_smoothing: float = 0.0  # dpo/simpo: assumed chance a preference label is flipped (cDPO), in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: target reward margin
    # dpo's reference model: "adapter" (the base with the PEFT delta switched off: needs a
    # peft method whose delta is a parameter transform, e.g. lora; no second copy of the
    # weights), "copy" (a frozen copy of the initial parameters, kept in the train state) or
    # "cached" (the initial parameters' log-probs of every pair, computed once before step 0
    # and stored in train.run_dir/reference_logprobs/: no reference forward, no reference weights)
    reference: str = "adapter"

    def validate(self) -> None:
        for key in ("mask_rate", "noise_density", "prefix_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise ConfigError(f"objective.{key}={value} must be in (0, 1)")
        if self.mask_token_rate + self.random_token_rate > 1.0:
            raise ConfigError("objective.mask_token_rate + objective.random_token_rate must be <= 1")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"objective.mean_span_length={self.mean_span_length} must be >= 1")
        names = self.name.split("+")
        if self.weights and len(self.weights) != len(names):
            raise ConfigError(f"objective.weights has {len(self.weights)} entries for "
                              f"{len(names)} objectives in objective.name={self.name!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"objective.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.reference not in ("adapter", "copy", "cached"):
            raise ConfigError(f"objective.reference={self.reference!r} is not 'adapter', 'copy' "
                              "or 'cached'")


@dataclasses.dataclass
class OptimizerConfig:
    """optax optimizer and learning-rate schedule."""

    name: str = "adamw"  # adamw | adafactor | lion | sgd
    learning_rate: float = 3e-4  # peak learning rate (after warmup)
    schedule: str = "cosine"  # constant | cosine | linear | rsqrt
    warmup_steps: int = 100  # linear warmup from 0 to learning_rate
    decay_steps: int = 0  # 0: train.steps
    end_learning_rate_fraction: float = 0.1  # cosine/linear: final rate / peak rate
    b1: float = 0.9  # adamw/lion first-moment decay
    b2: float = 0.95  # adamw/lion second-moment decay
    eps: float = 1e-8  # adamw denominator epsilon
    weight_decay: float = 0.1  # decoupled; never applied to norms, biases, embeddings' scales
    grad_clip: float = 1.0  # global-norm clipping; 0 = off

    def validate(self) -> None:
        _choice("optimizer.schedule", self.schedule, ("constant", "cosine", "linear", "rsqrt"))
        if self.learning_rate <= 0:
            raise ConfigError(f"optimizer.learning_rate={self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps={self.warmup_steps} must be >= 0")


@dataclasses.dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    batch_size: int = 8  # global, across all hosts and devices
    seq_len: int = 128
    grad_accum: int = 1  # micro-batches per step (batch_size must divide)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_steps: int = 4
    run_dir: str = "runs/default"
    init_from: str = ""  # checkpoint to load params from (fine-tuning)
    # LM head + cross-entropy over this many sequence positions at a time (0: all at once):
    # holds [batch, chunk, vocab] logits instead of [batch, seq, vocab], for ~1 extra head
    # forward. For large vocabularies (LLaMA 32k, GPT-2 50k, T5 32k) on accelerators.
    logits_chunk: int = 0
    compilation_cache: str = "~/.cache/llmjax/jax"  # "" = off
    progress: bool = True  # a progress bar on a terminal; log lines per interval otherwise
    tensorboard: bool = True
    plot: bool = True  # write run_dir/curves.png (llmjax plot) when the run ends
    # A step whose loss or gradient norm is NaN/inf: "stop" (error naming the step; the last
    # good checkpoint is kept) or "skip" (that update is not applied; training goes on).
    nonfinite: str = "stop"
    # ModelConfig architecture fields init_from may change (e.g. [rope_theta, max_len]);
    # any other architecture difference from the source is an error.
    init_override: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        _choice("train.nonfinite", self.nonfinite, ("stop", "skip"))
        fields = [f.name for f in dataclasses.fields(ModelConfig)]
        for name in self.init_override:
            if name not in fields:
                raise ConfigError(f"train.init_override: {name!r} is not a model field"
                                  f"{_suggest(name, fields)}")
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be positive")
        if self.logits_chunk < 0:
            raise ConfigError(f"train.logits_chunk={self.logits_chunk} must be >= 0 "
                              f"(0: the whole sequence at once)")
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.grad_accum={self.grad_accum} must divide "
                              f"train.batch_size={self.batch_size}")


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpointing of the train state, data iterator and config."""

    every: int = 0  # steps between saves; 0 = none by steps
    # Minutes between saves, checked at log intervals (train.log_every); 0 = none by time.
    # Either way the run saves at the end and on SIGTERM / Ctrl-C.
    every_minutes: float = 30.0
    keep: int = 3
    keep_best: bool = False  # also keep the best by eval loss
    async_save: bool = True
    resume: bool = True  # continue from the latest checkpoint in train.run_dir

    def validate(self) -> None:
        if self.every < 0 or self.every_minutes < 0:
            raise ConfigError(f"checkpoint.every={self.every} / checkpoint.every_minutes="
                              f"{self.every_minutes} must be >= 0 (0: off)")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep={self.keep} must be >= 1")


@dataclasses.dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning; method 'full' trains every parameter.

    `method` is one registered name or several joined by '+' (`lora+head`): the
    trainable set is the union of the methods' sets, their transforms apply in
    order. See llmjax/peft/methods.py for the registry and docs/peft.md for a table.
    """

    method: str = "full"
    # Regex (re.search) over '/'-joined parameter paths. lora: kernels to adapt (default
    # attention query/value; MoE experts 'mlp/(wi_0|wi_1|wo)' and router 'mlp/router' too);
    # ia3: modules to scale (default attention key/value, mlp/wo); freeze: leaves to freeze
    # (required). "" = the method's default.
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
    # QLoRA: store the frozen base block-quantized ("nf4" 4-bit NormalFloat or "int8") and
    # dequantize it inside the jitted step; "" keeps it in its dtype (llmjax/peft/quantize.py)
    base_quantization: str = ""
    quantization_block: int = 64  # elements per quantization block (one absmax scale each)
    # QLoRA's double quantization: the block scales stored as int8 in blocks of 256 (one
    # float32 absmax each, after subtracting their mean): 0.127 instead of 0.5 bits per weight
    double_quantization: bool = False

    def methods(self) -> list[str]:
        return [m.strip() for m in self.method.split("+") if m.strip()]

    def validate(self) -> None:
        if not self.methods():
            raise ConfigError("peft.method is empty: use 'full' or a method name such as 'lora'")
        if self.rank <= 0:
            raise ConfigError(f"peft.rank={self.rank} must be positive")
        if self.alpha <= 0:
            raise ConfigError(f"peft.alpha={self.alpha} must be positive")
        if self.num_virtual_tokens <= 0:
            raise ConfigError(f"peft.num_virtual_tokens={self.num_virtual_tokens} must be positive")
        if self.adapter_dim <= 0:
            raise ConfigError(f"peft.adapter_dim={self.adapter_dim} must be positive")
        if self.base_quantization not in ("", "nf4", "int8"):
            raise ConfigError(f"peft.base_quantization={self.base_quantization!r} must be '', "
                              "'nf4' or 'int8'")
        if self.quantization_block < 2 or self.quantization_block % 2:
            raise ConfigError(f"peft.quantization_block={self.quantization_block} must be an "
                              "even number >= 2")
        if self.double_quantization and not self.base_quantization:
            raise ConfigError("peft.double_quantization quantizes the scales of a quantized "
                              "base: set peft.base_quantization (nf4 or int8) too")
        if self.base_quantization and self.methods() == ["full"]:
            raise ConfigError("peft.base_quantization quantizes the frozen base, but "
                              "peft.method=full trains every parameter; use e.g. peft.method=lora")
        if self.prompt_init not in ("vocab", "random"):
            raise ConfigError(f"peft.prompt_init={self.prompt_init!r} must be 'vocab' or 'random'")
        if self.lora_dropout != 0.0:
            raise ConfigError(
                f"peft.lora_dropout={self.lora_dropout}: llmjax applies LoRA as a weight-space "
                f"transform (W + scale * A B), which never sees the activations dropout would act "
                f"on; set peft.lora_dropout=0 and use model.dropout for regularisation")
        for key in ("targets", "trainable"):
            try:
                re.compile(getattr(self, key))
            except re.error as err:
                raise ConfigError(f"peft.{key}={getattr(self, key)!r} is not a valid regex: "
                                  f"{err}") from None
        # Method names are checked against the registry where the plan is built
        # (llmjax.peft.plan.build): this section imports nothing of llmjax but errors.


# ----------------------------------------------------------------------------
# The data: section (llmjax.data.config re-exports it). Sequence length and global batch size
# are not here: they belong to the model and train sections and are passed to
# `make_iterator` as arguments.

SOURCES = ("synthetic", "text", "tfds", "labelled", "preference", "chat")
DOCUMENT_UNITS = ("file", "paragraph")


@dataclasses.dataclass
class DataConfig:
    """Where the text comes from and how it becomes batches."""

    # "synthetic" (random token ids), "text" (local files), "tfds" (catalogue dataset) or
    # "labelled" (local CSV / TSV / JSONL files of text + label columns, for classification)
    # or "preference" (JSONL files of prompt / chosen / rejected pairs, for dpo, orpo, simpo)
    # or "chat" (JSONL files of {"messages": [{role, content}]} conversations, for sft)
    source: str = "synthetic"
    train_files: list[str] = dataclasses.field(default_factory=list)  # globs of labelled / preference files (source=labelled, preference)
    validation_files: list[str] = dataclasses.field(default_factory=list)  # held-out labelled / preference files
    paths: list[str] = dataclasses.field(default_factory=list)  # globs of local UTF-8 text files (source=text)
    validation_paths: list[str] = dataclasses.field(default_factory=list)  # globs held out as validation (source=text)
    validation_fraction: float = 0.0  # fraction of documents held out when validation_paths is empty (source=text; chat and preference: of the rows, when validation_files is empty)
    document_unit: str = "file"  # "file": one document per file; "paragraph": per blank-line-separated block
    name: str = ""  # TFDS catalogue name, e.g. "c4/en", "lm1b", "wikipedia/20230601.en" (source=tfds)
    data_dir: str = ""  # TFDS data_dir holding prepared datasets (local path or gs://); text source builds into it
    train_split: str = "train"  # TFDS split used for training (TFDS split syntax, e.g. "train[:90%]")
    validation_split: str = "validation"  # TFDS split used for evaluation
    text_field: str = "text"  # feature holding the document text (lm, nsp)
    input_field: str = ""  # feature holding the input / prompt text (seq2seq, sft) or the text to classify
    target_field: str = ""  # feature holding the target / response text (seq2seq, sft)
    label_field: str = ""  # feature / column holding the class label (classification; labelled default "label")
    pair_field: str = ""  # optional second text of a pair: [CLS] text [SEP] pair [SEP] (classification)
    # Maps string labels to ids 0..n-1 (classification). Empty with source=labelled: the sorted
    # labels of data.train_files, filled in when the config is validated (so the run stores them).
    label_names: list[str] = dataclasses.field(default_factory=list)
    max_segments: int = 0  # classification rows packed with pack=true: at most this many examples per row (0: seq_len // 8)
    tokenizer: str = ""  # directory of a tokenizer written by `llmjax tokenizer train`
    chat_template: str = ""  # source=chat (and preference prompts given as messages): "" = the tokenizer's own template, or a built-in name: chatml
    pack: bool = True  # pack several documents / examples per row (lm, sft, classification); False: one per row, padded
    # lm rows: a document that does not fit the rest of a row fills it and goes on in the next
    # row (no padding; long seq_len over long documents, docs/long-context.md). False: it starts the next row.
    pack_split: bool = False
    shuffle: bool = True  # shuffle documents each epoch (training split only)
    seed: int = 0  # seed of the document shuffle
    num_workers: int = 0  # 0: tokenize in the calling thread; N > 0: N threads tokenize rows in parallel
    add_eos: bool = True  # append the tokenizer's eos id to every document / target (lm, seq2seq, sft)
    synthetic_vocab_size: int = 1024  # vocabulary of random token ids when source=synthetic and no tokenizer is set
    synthetic_num_documents: int = 10000  # number of random documents per epoch when source=synthetic

    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the key, its value and the fix for the first bad setting."""
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is not one of {SOURCES}; set data.source to one of them.")
        if self.document_unit not in DOCUMENT_UNITS:
            raise ConfigError(
                f"data.document_unit={self.document_unit!r} is not one of {DOCUMENT_UNITS}; "
                "use 'file' for one document per file or 'paragraph' for blank-line-separated blocks."
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(
                f"data.validation_fraction={self.validation_fraction} must be in [0, 1); e.g. 0.05 holds out 5% of documents."
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 (0 tokenizes in the calling thread).")
        if self.source == "text":
            if not self.paths:
                raise ConfigError("data.paths is empty but data.source='text'; set data.paths to globs of text files, e.g. ['corpus/*.txt'].")
            if not self.data_dir:
                raise ConfigError("data.data_dir is empty but data.source='text'; set it to a directory where the prepared dataset is written.")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='text'; train one with `llmjax tokenizer train` and set its directory.")
        if self.source == "tfds":
            if not self.name:
                raise ConfigError("data.name is empty but data.source='tfds'; set a TFDS catalogue name such as 'lm1b' or 'c4/en'.")
            if not self.data_dir:
                raise ConfigError("data.data_dir is empty but data.source='tfds'; set the TFDS data_dir where the dataset is prepared.")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='tfds'; train one with `llmjax tokenizer train` and set its directory.")
        if self.max_segments < 0:
            raise ConfigError(f"data.max_segments={self.max_segments} must be >= 0 (0: seq_len // 8).")
        if self.source == "labelled":
            if not self.train_files:
                raise ConfigError("data.train_files is empty but data.source='labelled'; set it to CSV / TSV / JSONL "
                                 "files with a text and a label column, e.g. data.train_files=[train.csv].")
            if not self.tokenizer:
                raise ConfigError("data.tokenizer is empty but data.source='labelled'; set the model's tokenizer "
                                 "directory (or train one with `llmjax tokenizer train`).")
            from llmjax.data.labelled import check_labelled

            check_labelled(self)  # reads the files once (cached): label names, columns, rows
        if self.source == "chat" and not (self.train_files and self.tokenizer):
            raise ConfigError("data.source='chat' needs data.train_files (JSONL files of "
                              '{"messages": [{"role": ..., "content": ...}]} rows) and data.tokenizer')
        if self.source == "preference" and not self.train_files:
            raise ConfigError("data.train_files is empty but data.source='preference'; set it to JSONL files "
                              'of {"prompt", "chosen", "rejected"} rows, e.g. data.train_files=[pairs.jsonl].')
        if self.synthetic_vocab_size < 16:
            raise ConfigError(f"data.synthetic_vocab_size={self.synthetic_vocab_size} must be >= 16.")
        if self.synthetic_num_documents < 1:
            raise ConfigError(f"data.synthetic_num_documents={self.synthetic_num_documents} must be >= 1.")


def fields_for_kind(config: DataConfig, kind: str) -> dict[str, str]:
    """The record fields a batch kind reads, checked to be set; raises ConfigError naming the missing key."""
    wants = {"chat": "sft", "preference": "preference"}.get(config.source)
    if wants and kind != wants:
        raise ConfigError(f"data.source={config.source!r} feeds objectives whose batch kind is {wants!r} "
                          f"({'sft' if wants == 'sft' else 'dpo, orpo, simpo'}), not {kind!r}; change "
                          "objective.name or data.source")
    if kind in ("lm", "nsp"):
        return {"text": config.text_field}
    if kind == "sft" and config.source == "chat":  # conversations (llmjax/data/chat.py)
        return {"messages": "messages"}
    if kind in ("seq2seq", "sft"):
        missing = [k for k in ("input_field", "target_field") if not getattr(config, k)]
        if missing:
            raise ConfigError(
                f"batch kind {kind!r} needs data.{' and data.'.join(missing)}; set them to the record fields holding "
                "the input (prompt) and target (response) text."
            )
        return {"input": config.input_field, "target": config.target_field}
    if kind == "preference":  # JSONL rows {"prompt", "chosen", "rejected"} (llmjax/data/preference.py)
        return {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}
    if kind == "classification":
        label = config.label_field or ("label" if config.source == "labelled" else "")
        if not label:
            raise ConfigError("batch kind 'classification' needs data.label_field; set it to the record field holding the label.")
        fields = {"input": config.input_field or config.text_field, "label": label}
        if config.pair_field:
            fields["pair"] = config.pair_field
        return fields
    raise ConfigError(f"unknown batch kind {kind!r}; use one of lm, nsp, seq2seq, sft, classification, preference.")


@dataclasses.dataclass
class Config:
    """A whole run: one field per section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    peft: PeftConfig = dataclasses.field(default_factory=PeftConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def validate(self) -> "Config":
        for field in dataclasses.fields(self):
            section = getattr(self, field.name)
            if hasattr(section, "validate"):
                section.validate()  # every section raises ConfigError
        if self.train.seq_len > self.model.max_len and self.model.position == "learned":
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds model.max_len="
                              f"{self.model.max_len} (learned positions): raise model.max_len "
                              f"or lower train.seq_len")
        if self.mesh.expert > 1 and not self.model.num_experts:
            raise ConfigError(f"mesh.expert={self.mesh.expert} splits experts, but the model is "
                              f"dense (model.num_experts=0): set mesh.expert=1")
        if self.mesh.expert > 1 and self.model.num_experts % self.mesh.expert:
            raise ConfigError(f"mesh.expert={self.mesh.expert} must divide model.num_experts="
                              f"{self.model.num_experts}; choose mesh.expert among "
                              f"{_divisors(self.model.num_experts)}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------
# Building configs from dicts, YAML files and overrides.

def config_dirs() -> list[Path]:
    """Where configs/ is looked up: $LLMJAX_CONFIGS, the working dir, the repo."""
    dirs = []
    if os.environ.get("LLMJAX_CONFIGS"):
        dirs.append(Path(os.environ["LLMJAX_CONFIGS"]))
    dirs += [Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"]
    return [d for d in dirs if d.is_dir()]


def preset_names() -> list[str]:
    names = set()
    for d in config_dirs():
        names.update(p.stem for p in (d / "models").glob("*.yaml"))
    return sorted(names)


def load_preset(name: str) -> dict:
    """The `model:` mapping of configs/models/NAME.yaml."""
    for d in config_dirs():
        path = d / "models" / f"{name}.yaml"
        if path.exists():
            data = read_yaml(path)
            return data.get("model", data)
    raise ConfigError(f"unknown model preset {name!r}{_suggest(name, preset_names())}; "
                      f"see `llmjax models` for the list")


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """A validated ModelConfig from a preset name plus keyword overrides."""
    data = dict(load_preset(name))
    data.update(overrides)
    cfg = section_from_dict(ModelConfig, data, "model")
    cfg.validate()
    return cfg


def from_dict(data: dict) -> Config:
    """A validated Config from a nested dict (sections as keys)."""
    data = dict(data or {})
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = {"preset": model}
    if isinstance(data.get("model"), dict) and "preset" in data["model"]:
        model = dict(data["model"])
        merged = dict(load_preset(model.pop("preset")))
        merged.update(model)
        data["model"] = merged
    cfg = section_from_dict(Config, data, "")
    for section, key in _HOME_PATHS:
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, key, os.path.expanduser(value))
    return cfg.validate()


# Paths a config may write as `~/...` (globs in data.paths are expanded where they are matched).
_HOME_PATHS = (("data", "data_dir"), ("data", "tokenizer"), ("train", "run_dir"),
               ("train", "init_from"))


def load(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Config from a YAML file (optional) and `a.b=value` overrides."""
    data: dict = read_yaml(path) if path else {}
    for override in overrides or []:
        apply_override(data, override)
    return from_dict(data)


def read_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML config file; ConfigError naming the file (and line:column) for a
    missing, empty, non-UTF-8 or malformed file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist{_config_hint(path)}")
    if path.is_dir():
        raise ConfigError(f"config {str(path)!r} is a directory; pass a YAML file such as "
                          f"configs/experiments/gpt-tiny.yaml")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte "
                          f"{raw[err.start]:#04x} at offset {err.start}); a config is a YAML "
                          f"text file") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"config file {str(path)!r} is empty; it needs sections such as "
                          f"model:, data:, train: (examples in configs/experiments/)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections "
                          f"(model:, data:, train: ...), not a {type(data).__name__}")
    return data


def parse_yaml(text: str, where: str, positions: bool = True) -> Any:
    """yaml.safe_load, with syntax errors as one-line ConfigErrors `where:line:column: ...`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark, start = err.problem_mark or err.context_mark, err.context_mark
        at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark and positions else where
        what = err.problem or err.context or "syntax error"
        if err.context and err.problem:
            since = (f" started at line {start.line + 1}, column {start.column + 1}"
                     if start and positions else "")
            what += f" ({err.context.removeprefix('while ')}{since})"
        raise ConfigError(f"{at}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid YAML: {err}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a duplicated `train:` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given at line {first.line + 1}, "
                        f"column {first.column + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)


def _config_hint(path: Path) -> str:
    """Where a config of that name does exist, if anywhere (e.g. `llmjax train gpt-tiny.yaml`)."""
    name = path.name if path.suffix else f"{path.name}.yaml"
    for d in config_dirs():
        if (d / "experiments" / name).is_file():
            return f" (did you mean {d / 'experiments' / name}?)"
    return ""


def apply_override(data: dict, override: str) -> None:
    """Set `section.key=value` (value parsed as YAML) in a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value "
                          f"(e.g. train.steps=100)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(part.isidentifier() for part in parts):
        raise ConfigError(f"override {override!r}: {key.strip()!r} is not a dotted key such as "
                          f"train.steps (docs/config.md lists every key)")
    node = data
    for part in parts[:-1]:
        if isinstance(node.get(part), str) and part == "model":  # `model: gpt2-small`
            node[part] = {"preset": node[part]}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = parse_yaml(raw, f"override {override!r}", positions=False) if raw.strip() else ""


def section_from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of config dataclass `cls` (a section such as ModelConfig, or Config) from a
    mapping: unknown keys and wrong types raise ConfigError naming `prefix.key`. Not validated:
    call `.validate()` (or use `from_dict` / `model_config`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown key {where!r}{_suggest(key, names)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return section_from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number(value)  # `steps: 1e5` (YAML 1.1 reads it as a string) or `2.0`
        if number is not None and number.is_integer():
            return int(number)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list or hint is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(hint) or (Any,)
            return [v if item is Any else _coerce(item, v, f"{where}[{i}]")
                    for i, v in enumerate(value)]
        if isinstance(value, str):  # a single path or name
            return [value]
    elif origin is dict or hint is dict or hint is Any:
        return value
    raise ConfigError(f"{where} expects {_type_name(hint)}, got {value!r} ({type(value).__name__})")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {list(choices)}{_suggest(value, choices)}")


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
