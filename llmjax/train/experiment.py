"""From a Config to everything a run needs: mesh, model, objective, optimizer, sharded state,
jitted steps and batch shardings. The trainer, tests and benchmarks all start here."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax.sharding import Mesh

from llmjax import objectives, parallel, peft
from llmjax.config import Config, ConfigError
from llmjax.data.labelled import check_num_labels
from llmjax.data.tokenizer import SpecialTokens, load_tokenizer
from llmjax.models import Transformer, dummy_inputs
from llmjax.models.api import abstract_params
from llmjax.train import optim
from llmjax.train.state import TrainState, new_state, state_shardings
from llmjax.tree import init_variables, logical_names
from llmjax.train.step import jit_step, make_eval_step, make_train_step


@dataclasses.dataclass
class Experiment:
    """The resolved pieces of a run (no arrays until `init_state`)."""

    config: Config
    mesh: Mesh
    rules: tuple
    model: Transformer
    objective: objectives.Objective
    plan: Any
    tx: Any
    schedule: Callable
    special: SpecialTokens
    names: dict  # {param path: logical axis names}
    # objective.reference=cached: {split: {"ref_chosen", "ref_rejected": float32 [documents]}}
    # (llmjax/train/reference_cache.py fills it; data_iterator attaches it to the batches)
    reference_logprobs: dict = dataclasses.field(default_factory=dict)

    @property
    def model_config(self):
        return self.model.cfg

    def _init_fn(self, rng, loaded: Optional[dict] = None) -> TrainState:
        cfg = self.model.cfg
        init_rng, peft_rng, state_rng = jax.random.split(rng, 3)
        params = nn.unbox(init_variables(self.model, init_rng, **dummy_inputs(cfg))["params"])
        if loaded is not None:
            params = loaded(params)
        trainable, frozen = self.plan.split(params, peft_rng)
        return new_state(trainable, frozen, self.tx, state_rng)

    def abstract_state(self, loaded=None) -> TrainState:
        return jax.eval_shape(functools.partial(self._init_fn, loaded=loaded),
                              jax.random.key(self.config.train.seed))

    def state_shardings(self, abstract: Optional[TrainState] = None) -> TrainState:
        abstract = abstract or self.abstract_state()
        return state_shardings(abstract, self.names, self.mesh, self.rules, self.plan.axes)

    def init_state(self, loaded: Optional[Callable[[dict], dict]] = None) -> TrainState:
        """Sharded init: jit with out_shardings, so no device ever holds the whole state.

        `loaded(params) -> params` may replace freshly initialised leaves (init_from).
        """
        sh = self.state_shardings(self.abstract_state(loaded))
        init = jax.jit(functools.partial(self._init_fn, loaded=loaded), out_shardings=sh)
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return init(jax.random.key(self.config.train.seed))

    def batch_shardings(self, batch_keys) -> dict:
        sh = parallel.batch_sharding(self.mesh)
        return {k: sh for k in batch_keys}

    def train_step(self, batch_keys, state_sh: Optional[TrainState] = None) -> Callable:
        train = self.config.train
        fn = make_train_step(self.model, self.objective, self.tx, self.plan, self.schedule,
                             train.grad_accum, train.logits_chunk,
                             skip_nonfinite=train.nonfinite == "skip")
        return jit_step(fn, self.mesh, self.rules, state_sh or self.state_shardings(),
                        self.batch_shardings(batch_keys))

    def eval_step(self, batch_keys, state_sh: Optional[TrainState] = None) -> Callable:
        fn = make_eval_step(self.model, self.objective, self.plan,
                            self.config.train.logits_chunk)
        return jit_step(fn, self.mesh, self.rules, state_sh or self.state_shardings(),
                        self.batch_shardings(batch_keys), donate=False)


def build(config: Config, devices=None, special: Optional[SpecialTokens] = None) -> Experiment:
    """Resolve a validated Config; fails early (before any compile) on inconsistencies."""
    mesh = parallel.make_mesh(config.mesh, devices)
    rules = parallel.rules_from_config(config.mesh)
    parallel.shard_batch_spec(mesh, config.train.batch_size)
    shards = parallel.batch_shards(mesh)
    micro = config.train.batch_size // config.train.grad_accum
    if micro % shards:
        raise ConfigError(f"train.batch_size={config.train.batch_size} / train.grad_accum="
                          f"{config.train.grad_accum} = {micro} rows per micro-batch must be "
                          f"divisible by mesh {parallel.batch_axes_label(mesh)}={shards}")
    plan = peft.build(config.peft)
    model_cfg = plan.model_config(config.model)
    model_cfg.validate()
    if model_cfg.num_heads % mesh.shape["tensor"]:
        raise ConfigError(f"model.num_heads={model_cfg.num_heads} is not divisible by "
                          f"mesh.tensor={mesh.shape['tensor']}: choose a tensor size that divides it")
    special = special or _special_tokens(config)
    if special.num_special >= model_cfg.vocab_size:
        raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} leaves no room beside "
                          f"{special.num_special} special tokens")
    objective = objectives.build(config.objective, model_cfg, special)
    if getattr(objective, "needs_reference", False):  # dpo: the plan also yields the reference
        from llmjax.peft.reference import ReferencePlan
        plan = ReferencePlan(plan, config.objective.reference)
    check_num_labels(config.data, model_cfg)  # the classifier head fits the data's label names
    if config.train.logits_chunk and model_cfg.architecture == "encoder":
        raise ConfigError("train.logits_chunk chunks the LM head of decoders and encoder-"
                          "decoders; an encoder's MLM head computes its logits whole: set "
                          "train.logits_chunk=0")
    tx, schedule = optim.make_optimizer(config.optimizer, config.train.steps)
    names = logical_names(abstract_params(model_cfg))
    return Experiment(config, mesh, rules, Transformer(model_cfg), objective, plan, tx, schedule,
                      special, names)


def _special_tokens(config: Config) -> SpecialTokens:
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer).special_ids
    return SpecialTokens()
