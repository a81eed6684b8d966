"""Task scoring across processes: two local processes of 4 CPU devices each (jax.distributed
on 127.0.0.1) score the bundled multiple-choice, cloze and generation tasks and a set of raw
log-likelihood requests on a (data 2, fsdp 2, tensor 2) mesh, and get exactly what one
process with all 8 devices gets."""
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import xla_flags

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent('''
    import json, sys, types


    def score(spec):
        """Task metrics and raw request scores on a (2, 2, 2) mesh over all devices."""
        import jax
        import numpy as np
        from llmjax import parallel
        from llmjax.config import MeshConfig, model_config
        from llmjax.data.tokenizer import HFTokenizer
        from llmjax.evaluation.lm import ModelLM, evaluate_loaded, load_tasks, plain_results
        from llmjax.models import init_params
        tok = HFTokenizer(spec["tokenizer"], special_tokens={"eos": "<eos>"})
        cfg = model_config("llama-tiny", vocab_size=tok.vocab_size, d_model=32, num_layers=1,
                           num_heads=4, num_kv_heads=2, d_ff=48, max_len=96)
        params = jax.tree.map(np.asarray, init_params(cfg, jax.random.key(0)))  # every host
        mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices())
        model = types.SimpleNamespace(config=cfg, params=params, tokenizer=tok, source="random")
        lm = ModelLM(model, batch_rows=4, mesh=mesh, max_gen_toks=6)
        tasks = {}
        for task, limit in (("tiny_mc", 4), ("tiny_gen", 2)):
            tasks.update(plain_results(evaluate_loaded(lm, load_tasks([task]), limit=limit)))
        text = "Question: Which animal says moo? Answer: cow"
        requests = [(tok.encode(text[:i]), tok.encode(text[i:])) for i in (5, 17, 30, 38)]
        scores = [[s.logprob, s.is_greedy] for s in lm.scorer.loglikelihood(requests)]
        return {"tasks": tasks, "scores": scores}


    if __name__ == "__main__":
        spec = json.loads(sys.argv[1])
        import jax
        jax.distributed.initialize(spec["coordinator"], num_processes=2,
                                   process_id=spec["process_id"])
        from llmjax import compile_cache
        compile_cache.enable(spec["cache"])
        result = score(spec)
        if jax.process_index() == 0:
            with open(spec["out"], "w") as f:
                json.dump(result, f)
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _char_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models

    from llmjax.evaluation.task_files import BUNDLED_TASKS

    text = "".join(p.read_text() for p in sorted(BUNDLED_TASKS.glob("*.jsonl")))
    chars = sorted(set(text + "Question:Answer") - {"\n"}) + ["\n"]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<eos>"] = len(vocab)
    path.mkdir(parents=True)
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(path / "tokenizer.json"))
    return path


def test_two_processes_score_tasks_like_one(tmp_path, child_script, cache_dir):
    spec = {"tokenizer": str(_char_tokenizer(tmp_path / "tok")), "cache": str(cache_dir),
            "out": str(tmp_path / "two.json")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMJAX_")}
    env.update(XLA_FLAGS=xla_flags(4), JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(child_script), json.dumps(dict(
            spec, process_id=i, coordinator=f"127.0.0.1:{port}"))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:  # meanwhile the reference: this process, all 8 devices, the same program
        namespace: dict = {}
        exec(compile(CHILD, "child", "exec"), namespace)
        one = json.loads(json.dumps(namespace["score"](spec)))  # as the child writes it
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert set(one["tasks"]) == {"tiny_mc", "tiny_gen"} and len(one["scores"]) == 4
    assert json.loads(Path(spec["out"]).read_text()) == one
