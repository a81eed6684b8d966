"""An llmjax-trained sentencepiece tokenizer as an HF `tokenizer.json` (+ tokenizer_config.json).

llmjax trains with exact round trips (identity normalisation, no dummy prefix,
whitespace runs kept as their own pieces, byte fallback; llmjax/data/tokenizer.py),
which a LlamaTokenizer built from tokenizer.model would not reproduce (it adds a
prefix space and splits whitespace runs). The equivalent `tokenizers` pipeline:
spaces become U+2581, text splits before each run of U+2581, BPE merges ranked by
the merged piece's id (sentencepiece merges the best-scoring pair first; BPE piece
scores fall with the id) or Unigram with the model's scores, byte fallback.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
SPACE = "\u2581"


def _merges(vocab: dict[str, int], skip: set[str]) -> list[tuple[str, str]]:
    merges = []
    for piece, rank in vocab.items():
        if piece in skip:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(m[3], m[4]) for m in sorted(merges)]


def sentencepiece_tokenizer_json(model_file: str | Path, metadata: dict) -> str:
    """tokenizer.json text equivalent to the llmjax sentencepiece model `model_file`."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    control = {i for i in range(n) if sp.is_control(i)}
    unk = sp.unk_id()
    byte = {i for i in range(n) if sp.is_byte(i)}
    if metadata.get("model_type") == "unigram":
        model = models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)], unk_id=unk,
                               byte_fallback=True)
    else:
        vocab = {p: i for i, p in enumerate(pieces)}
        specials = {pieces[i] for i in control | byte | {unk}}
        model = models.BPE(vocab=vocab, merges=_merges(vocab, specials), unk_token=pieces[unk],
                           fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SPACE}+"), behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    # Control pieces (pad, bos, eos) are special; user-defined ones ([MASK], sentinels) are
    # matched in raw text, as sentencepiece matches them.
    added = [AddedToken(pieces[i], special=True, normalized=False) for i in sorted(control | {unk})]
    user = [AddedToken(p, special=False, normalized=False) for i, p in enumerate(pieces)
            if i not in control and i != unk and i not in byte and _user_defined(sp, i, metadata)]
    tok.add_special_tokens(added)
    tok.add_tokens(user)
    return tok.to_str()


def _user_defined(sp: Any, index: int, metadata: dict) -> bool:
    piece = sp.id_to_piece(index)
    named = set(metadata.get("special_pieces", {}).values())
    fmt = metadata.get("special_pieces", {}).get("sentinel_format", "<extra_id_{}>")
    return piece in named or (piece.startswith(fmt.split("{")[0]) and piece.endswith(">"))


def write_sentencepiece_as_hf(tokenizer: Any, metadata_file: Path, out: Path) -> list[str]:
    """tokenizer.json + tokenizer_config.json in `out` for an llmjax-trained tokenizer; []
    (and a warning) when its options have no exact HF equivalent."""
    metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    if not metadata.get("exact_round_trip", False):
        log.warning("%s: trained without exact_round_trip (NFKC, dummy prefix); no exact HF "
                    "tokenizer.json equivalent, so the export carries no tokenizer",
                    metadata_file)
        return []
    model_file = metadata_file.parent / metadata["model_file"]
    (out / "tokenizer.json").write_text(sentencepiece_tokenizer_json(model_file, metadata),
                                        encoding="utf-8")
    special = tokenizer.special_ids
    pieces = metadata.get("special_pieces", {})
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000_000_000_019_884_624_838_656}
    for role in ("pad", "unk", "bos", "eos", "mask", "cls", "sep"):
        if role in pieces:
            config[f"{role}_token"] = pieces[role]
        elif role in special:
            config[f"{role}_token"] = tokenizer.id_to_piece(special[role])
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n",
                                               encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json"]
