"""Chat conversations for supervised fine-tuning: JSONL rows {"messages": [{role, content}]}
rendered with the model's chat template; the loss mask covers the assistant turns only.

The template is the tokenizer's own (the Jinja `chat_template` of an imported HF tokenizer,
rendered in llmjax.data.chat_template's sandbox) or a built-in one named by
data.chat_template (BUILTIN_TEMPLATES; "chatml" for llmjax-trained models, whose own
tokenizers carry no template).

Which tokens are the assistant's: for assistant message i, the text the template adds when
the conversation grows from messages[:i] (with the generation prompt) to messages[:i+1] —
the reply and its end-of-turn marker, not the "<|im_start|>assistant" header. The whole
conversation is tokenized in one piece (as transformers' apply_chat_template does, so the
ids are identical); with an HF fast tokenizer each token's character offsets place it
inside or outside those spans. Tokenizers without offsets encode the text span by span.
A conversation is one piece of an "sft" row: packing never splits it.
"""
from __future__ import annotations

import bisect
import json
from typing import Any

import numpy as np

from llmjax.data.chat_template import render_chat_template
from llmjax.data.jsonl_rows import json_lines
from llmjax.errors import ConfigError, ConversionError

# A ChatML template for models trained with llmjax (its tokenizers have no template).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
BUILTIN_TEMPLATES = {"chatml": CHATML}
ROLES = ("system", "user", "assistant", "tool")


def read_conversations(path: str) -> list[dict[str, Any]]:
    """The checked rows of one JSONL file, each {"messages": [...], "where": "file line n"}."""
    rows = []
    example = '{"messages": [{"role": "user", "content": "..."}, ...]}'
    for where, record in json_lines(path, example):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: no 'messages' list; a chat row is "
                              '{"messages": [{"role": ..., "content": ...}, ...]}')
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ConfigError(f"{where}: messages[{i}] needs a string 'role' and a string "
                                  f"'content', got {json.dumps(message)[:120]}")
            if message["role"] not in ROLES:
                raise ConfigError(f"{where}: messages[{i}] has role {message['role']!r}; use one "
                                  f"of {list(ROLES)}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{where}: no assistant message, so nothing to learn; add one or "
                              "remove the row")
        rows.append({"messages": messages, "where": where})
    if not rows:
        raise ConfigError(f"{path} holds no conversations")
    return rows


def open_chat(config, split: str):
    """The checked rows of data.train_files / data.validation_files (or a held-out share)."""
    from llmjax.data.jsonl_rows import open_rows

    return open_rows(config, split, read_conversations, "chat conversations")


class ChatRenderer:
    """messages -> (token ids, assistant mask) under one template and tokenizer."""

    def __init__(self, tokenizer, template_name: str = ""):
        self.tokenizer = tokenizer
        if template_name:
            if template_name not in BUILTIN_TEMPLATES:
                raise ConfigError(f"data.chat_template={template_name!r} is not a built-in template "
                                  f"({sorted(BUILTIN_TEMPLATES)}); leave it empty to use the "
                                  "tokenizer's own template")
            self.template, self.source = BUILTIN_TEMPLATES[template_name], f"built-in {template_name!r}"
        elif hasattr(tokenizer, "chat_template"):
            self.template, self.source = tokenizer.chat_template()
        else:
            raise ConfigError("the tokenizer has no chat template; set data.chat_template=chatml "
                              f"(built-in templates: {sorted(BUILTIN_TEMPLATES)})")
        self.variables = self._special_variables(tokenizer)

    @staticmethod
    def _special_variables(tokenizer) -> dict[str, str]:
        """bos_token, eos_token, ... as transformers passes them to templates."""
        out = {}
        to_piece = getattr(tokenizer, "id_to_piece", None)
        if to_piece is None:
            return out
        for role, token_id in tokenizer.special_ids.items():
            if isinstance(token_id, int) and 0 <= token_id < tokenizer.vocab_size:
                out[f"{role}_token"] = to_piece(token_id)
        return out

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
        try:
            return render_chat_template(self.template, self.source, messages,
                                        add_generation_prompt, **self.variables)
        except ConversionError as err:
            raise ConfigError(f"{where + ': ' if where else ''}{err}") from None

    def spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """(the conversation's text, [start, end) character spans of the assistant turns)."""
        text = self.render(messages, False, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, where) if i else ""
            after = self.render(messages[:i + 1], False, where)
            if not (after.startswith(before) and text.startswith(after)):
                raise ConfigError(
                    f"{where}: the chat template ({self.source}) renders earlier turns "
                    f"differently once later ones follow, so assistant turn {i} cannot be "
                    "located in the conversation; use a template that appends turns "
                    "(e.g. data.chat_template=chatml)")
            spans.append((len(before), len(after)))
        return text, spans

    def encode(self, messages: list[dict], where: str = "",
               last_turn_only: bool = False) -> tuple[list[int], list[int]]:
        """(token ids of the whole conversation, 1 on assistant tokens else 0); with
        last_turn_only, 1 on the last assistant turn only."""
        text, spans = self.spans(messages, where)
        if last_turn_only:
            spans = spans[-1:]
        with_offsets = getattr(self.tokenizer, "encode_with_offsets", None)
        if with_offsets is not None:
            ids, offsets = with_offsets(text)
            starts = [s for s, _ in spans]
            mask = []
            for begin, end in offsets:
                k = bisect.bisect_right(starts, begin) - 1  # the last span starting at or before
                mask.append(int(k >= 0 and begin < spans[k][1] and end > begin))
            return ids, mask
        ids, mask, cursor = [], [], 0
        for begin, end in spans + [(len(text), len(text))]:
            for piece, flag in ((text[cursor:begin], 0), (text[begin:end], 1)):
                if piece:
                    part = self.tokenizer.encode(piece)
                    ids += part
                    mask += [flag] * len(part)
            cursor = end
        return ids, mask


    def prompt_and_completion(self, prompt: list[dict], completion: str,
                              where: str = "") -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids) of `completion` as the assistant's reply to the prompt
        messages: the completion is what the template adds for that reply (with its end-of-turn
        marker), the prompt everything before it (with the generation prompt)."""
        messages = list(prompt) + [{"role": "assistant", "content": completion}]
        ids, mask = self.encode(messages, where, last_turn_only=True)
        start = mask.index(1) if 1 in mask else len(ids)
        return ids[:start], ids[start:]


class LazyChatRenderer:
    """A ChatRenderer made on first use (preference rows whose prompt is a list of messages;
    rows with a text prompt never need a template)."""

    def __init__(self, tokenizer, template_name: str = ""):
        self.tokenizer, self.template_name, self._renderer = tokenizer, template_name, None

    def __getattr__(self, name):
        if self._renderer is None:
            if self.tokenizer is None:
                raise ConfigError("a prompt given as messages needs data.tokenizer (and its chat "
                                  "template, or data.chat_template=chatml)")
            self._renderer = ChatRenderer(self.tokenizer, self.template_name)
        return getattr(self._renderer, name)


def conversation_piece(ids: list[int], mask: list[int], seq_len: int) -> tuple[dict, bool]:
    """An sft piece (tokens, loss_mask) of one conversation, cut to seq_len (and whether)."""
    cut = len(ids) > seq_len
    return ({"tokens": np.asarray(ids[:seq_len], np.int32),
             "loss_mask": np.asarray(mask[:seq_len], np.int32)}, cut)
