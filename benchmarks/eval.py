"""Log-likelihood scoring speed: the bundled 20-item multiple-choice task (80 requests) on
SmolLM2-135M (fp32, from the GGUF), llmjax's packed scorer vs transformers scoring one
request at a time; alternating rounds; also the largest difference in log-likelihood.

    python benchmarks/eval.py --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import median, table  # noqa: E402
from benchmarks.generate import load_models  # noqa: E402


def requests(tokenizer) -> list[tuple[list[int], list[int]]]:
    from llmjax.evaluation.task_files import BUNDLED_TASKS

    out = []
    for line in (BUNDLED_TASKS / "tiny_mc.jsonl").read_text().splitlines():
        item = json.loads(line)
        context = f"Question: {item['question']}\nAnswer:"
        ctx = tokenizer.encode(context)
        for choice in item["choices"]:
            out.append((ctx, tokenizer.encode(context + " " + choice)[len(ctx):]))
    return out


def main(argv=None) -> int:
    import numpy as np
    import torch

    from llmjax.evaluation.scoring import Scorer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--row-len", type=int, default=256)
    args = p.parse_args(argv)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = load_models(Path(tmp))
        reqs = requests(model.tokenizer)
        scorer = Scorer(model.config, model.params, row_len=args.row_len,
                        batch_rows=args.batch_rows)

        def theirs():
            out = []
            with torch.no_grad():
                for ctx, cont in reqs:
                    full = torch.tensor([ctx + cont])
                    logp = torch.log_softmax(hf(full[:, :-1]).logits.float(), -1)[0]
                    n = len(cont)
                    out.append(float(logp[-n:].gather(-1, full[0, -n:, None]).double().sum()))
            return out

        t = time.perf_counter()
        ours_scores = [s.logprob for s in scorer.loglikelihood(reqs)]
        compile_s = time.perf_counter() - t
        diff = float(np.max(np.abs(np.array(ours_scores) - np.array(theirs()))))
        times = {"llmjax": [], "transformers": []}
        for _ in range(args.rounds):
            ours = lambda: scorer.loglikelihood(reqs)  # noqa: E731
            for name, fn in (("llmjax", ours), ("transformers", theirs)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        ours_s, theirs_s = median(times["llmjax"]), median(times["transformers"])
        print(f"SmolLM2-135M fp32, tiny_mc: {len(reqs)} requests, llmjax rows of "
              f"{args.row_len} tokens x {args.batch_rows} per pass; first call {compile_s:.1f} s")
        print(table(["", "requests/s", "seconds"],
                    [["llmjax packed", f"{len(reqs) / ours_s:.1f}", f"{ours_s:.2f}"],
                     ["transformers, one at a time", f"{len(reqs) / theirs_s:.1f}",
                      f"{theirs_s:.2f}"],
                     ["speed-up", f"{theirs_s / ours_s:.2f}x", ""],
                     ["max |log-likelihood difference|", f"{diff:.2e}", ""]]))
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
