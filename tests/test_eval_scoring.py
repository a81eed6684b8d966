"""Log-likelihood scoring: per-request log-likelihoods and is-greedy equal transformers' (fp32,
tiny random LLaMA) within 1e-4; packing requests into shared rows changes nothing (bit for bit with the reference attention);
rolling windows tile a document and, when it fits one window, give its full log-likelihood;
a sharded scorer agrees; impossible requests are refused by name."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from llmjax.config import ConfigError, MeshConfig  # noqa: E402
from llmjax.evaluation.scoring import Scorer, pack, rolling_windows  # noqa: E402
from llmjax.parallel import make_mesh  # noqa: E402
from llmjax.pretrained import from_pretrained  # noqa: E402

V, MAX = 101, 32
rng = np.random.RandomState(0)
REQUESTS = [(rng.randint(3, V, c).tolist(), rng.randint(3, V, k).tolist())
            for c, k in [(5, 1), (9, 3), (1, 4), (20, 2), (3, 7), (30, 2), (12, 12), (2, 1)]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(1)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return hf, from_pretrained(path, max_len=MAX)


@pytest.fixture(scope="module")
def scorer(llama):
    model = llama[1]
    return Scorer(model.config, model.params, batch_rows=4)


def _hf_score(hf, context, continuation):
    full = torch.tensor([(context + continuation)[-(MAX + 1):]])
    with torch.no_grad():
        logp = torch.log_softmax(hf(full[:, :-1]).logits.float(), -1)[0]
    n = len(continuation)
    picked = logp[-n:].gather(-1, full[0, -n:, None])[:, 0]
    return float(picked.double().sum()), bool((logp[-n:].argmax(-1) == full[0, -n:]).all())


def test_loglikelihood_equals_transformers(llama, scorer):
    hf, _ = llama
    got = scorer.loglikelihood(REQUESTS)
    for (ctx, cont), score in zip(REQUESTS, got):
        ref_logp, ref_greedy = _hf_score(hf, ctx, cont)
        assert abs(score.logprob - ref_logp) <= 1e-4 and score.is_greedy == ref_greedy
    # a continuation that is greedy by construction: the model's own argmax
    ctx = REQUESTS[1][0]
    with torch.no_grad():
        best = int(hf(torch.tensor([ctx])).logits[0, -1].argmax())
    assert scorer.loglikelihood([(ctx, [best])])[0].is_greedy


def test_packed_scoring_equals_one_request_per_row_exactly(llama, scorer):
    rows = pack([len(c) + len(k) - 1 for c, k in REQUESTS], MAX)
    assert len(rows) < len(REQUESTS)  # requests really share rows
    # With the reference attention every row reduces over the same keys: bit for bit.
    model = llama[1]
    xla = Scorer(dataclasses.replace(model.config, kernels="xla"), model.params, batch_rows=4)
    assert xla.loglikelihood(REQUESTS) == xla.loglikelihood(REQUESTS, packed=False)
    # The CPU blockwise attention (the default here) skips key blocks above the causal
    # diagonal, so a request's position in its row changes the summation order: rounding only.
    packed, alone = scorer.loglikelihood(REQUESTS), scorer.loglikelihood(REQUESTS, packed=False)
    assert [s.is_greedy for s in packed] == [s.is_greedy for s in alone]
    np.testing.assert_allclose([s.logprob for s in packed], [s.logprob for s in alone],
                               rtol=1e-6)


def test_rolling_windows_tile_the_document():
    doc = list(range(10, 60))
    for window, stride in [(16, 16), (16, 5), (8, 1)]:
        windows = rolling_windows(doc, 1, window, stride)
        assert sum((cont for _, cont in windows), []) == doc
        assert all(len(ctx) + len(cont) - 1 <= window for ctx, cont in windows)
        assert windows[0][0] == [1]
        # each window fills its input with as many earlier tokens as there are
        starts = np.cumsum([0] + [len(cont) for _, cont in windows])[:-1]
        assert all(len(ctx) == min(window - len(cont), s) + 1
                   for (ctx, cont), s in zip(windows, starts))


def test_loglikelihood_rolling(llama, scorer):
    hf, _ = llama
    short = rng.randint(3, V, 20).tolist()
    got = scorer.loglikelihood_rolling([short], prefix_id=1)[0]
    assert abs(got - _hf_score(hf, [1], short)[0]) <= 1e-4
    long = rng.randint(3, V, 75).tolist()
    ref = sum(_hf_score(hf, c, k)[0] for c, k in rolling_windows(long, 1, MAX, 8))
    assert abs(scorer.loglikelihood_rolling([long], 1, stride=8)[0] - ref) <= 1e-4


def test_sharded_scoring_equals_single_device(llama, scorer):
    model = llama[1]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    sharded = Scorer(model.config, model.params, mesh=mesh, batch_rows=4)
    for a, b in zip(sharded.loglikelihood(REQUESTS), scorer.loglikelihood(REQUESTS)):
        assert abs(a.logprob - b.logprob) <= 1e-5 and a.is_greedy == b.is_greedy


@pytest.mark.parametrize("request_,match", [
    (([1, 2], list(range(3, 3 + MAX + 1))), r"request 0: continuation of 33 tokens is longer "
                                            r"than the context window \(32 tokens\)"),
    (([1, 2], []), "request 0: empty continuation"),
    (([], [4]), "request 0: empty context"),
    (([1, 2], [V]), r"request 0 continuation: id 101 at position 0"),
])
def test_bad_requests_are_refused_by_name(scorer, request_, match):
    with pytest.raises(ConfigError, match=match):
        scorer.loglikelihood([request_])
