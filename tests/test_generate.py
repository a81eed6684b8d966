"""Fast decoding: greedy output of the device-side decode loop equals transformers' `generate`
token for token (tiny random LLaMA, prompts of different lengths, an end id); streaming gives
the same tokens; a sharded run (rows over data, KV heads over tensor) the same again."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from llmjax.config import MeshConfig  # noqa: E402
from llmjax.generate import cache_shardings, generate  # noqa: E402
from llmjax.parallel import make_mesh  # noqa: E402
from llmjax.pretrained import from_pretrained  # noqa: E402

V = 101
PROMPTS = [[5, 17, 9, 33, 42, 7, 61], [7, 8], [90, 3, 3, 14]]
NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return hf, from_pretrained(path)


def _hf_greedy(hf, prompt, eos=None):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
    return out[:out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def greedy(llama):
    _, model = llama
    return generate(model.config, model.params, PROMPTS, max_new_tokens=NEW)


def test_batched_greedy_equals_transformers(llama, greedy):
    hf, _ = llama
    assert greedy == [_hf_greedy(hf, p) for p in PROMPTS]


def test_end_ids_stop_each_row_where_transformers_stops(llama, greedy):
    hf, model = llama
    eos = greedy[0][4]  # an id the first row meets mid-way
    got = generate(model.config, model.params, PROMPTS, max_new_tokens=NEW, eos_id=[eos, 99])
    assert got == [_hf_greedy(hf, p, eos) for p in PROMPTS]
    assert len(got[0]) == 4


def test_streaming_shows_the_same_tokens_one_step_at_a_time(llama, greedy):
    _, model = llama
    steps = []
    got = generate(model.config, model.params, PROMPTS, max_new_tokens=NEW, on_token=steps.append)
    assert got == greedy and len(steps) == NEW
    assert [[s[i] for s in steps] for i in range(len(PROMPTS))] == greedy


def test_sharded_decoding_equals_single_device(llama, greedy):
    _, model = llama
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    got = generate(model.config, model.params, PROMPTS, max_new_tokens=NEW, mesh=mesh)
    assert got == greedy  # 3 rows padded to 4 for the data axis; the dummy row is dropped
    cache = {"decoder": {"layers": {"attention": {
        "cached_key": jax.ShapeDtypeStruct((2, 4, 32, 2, 8), np.float32),
        "segments": jax.ShapeDtypeStruct((2, 4, 32), np.int32),
        "index": jax.ShapeDtypeStruct((2,), np.int32)}}}}
    specs = jax.tree.map(lambda s: tuple(s.spec), cache_shardings(cache, mesh))
    attention = specs["decoder"]["layers"]["attention"]
    assert attention["cached_key"] == (None, "data", None, "tensor", None)
    assert attention["segments"] == (None, "data", None)
    assert attention["index"] == (None,)


def test_cli_stream_prints_what_the_plain_command_prints(tmp_path, capsys):
    """`llmjax generate --stream` shows the same text as without it (one token at a time)."""
    from tokenizers import Tokenizer, models

    from llmjax.cli import main
    from llmjax.config import model_config
    from llmjax.data.tokenizer import HFTokenizer
    from llmjax.models import init_params
    from llmjax.pretrained import PretrainedModel

    vocab = {chr(ord("a") + i): i for i in range(26)}
    (tmp_path / "tok").mkdir()
    Tokenizer(models.BPE(vocab=vocab, merges=[])).save(str(tmp_path / "tok" / "tokenizer.json"))
    cfg = model_config("llama-tiny", vocab_size=26, d_model=32, num_layers=1, num_heads=4,
                       d_ff=48, max_len=32)
    PretrainedModel(cfg, init_params(cfg, jax.random.key(0)),
                    HFTokenizer(tmp_path / "tok")).save(tmp_path / "m")
    args = ["generate", str(tmp_path / "m"), "--prompt", "abc", "--max-new-tokens", "6"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream"]) == 0
    assert capsys.readouterr().out == plain and plain.startswith("abc")
    assert len(plain.split()) == 6  # this decoder puts a space between the new letters
