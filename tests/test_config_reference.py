"""docs/config.md is generated from the config dataclasses and must match them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from llmjax import config_reference as ref

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python -m llmjax.config_reference > docs/config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == ref.render(), (
        f"docs/config.md is stale: regenerate it with `{REGENERATE}`")


def test_every_key_has_a_type_default_and_meaning():
    keys = set()
    for section, cls in ref.sections():
        for key, type_, default, meaning in ref.rows(section, cls):
            keys.add(key)
            assert type_ and default, key
            assert meaning, (f"{key} has no meaning: add a comment to the field in "
                             f"{cls.__module__}.{cls.__name__}, then `{REGENERATE}`")
    assert {"model.d_model", "train.steps", "data.tokenizer", "peft.rank"} <= keys
    dead = [k for k in ref.FALLBACK if k not in keys]
    assert not dead, f"FALLBACK names keys that no longer exist: {dead}"


def test_comments_above_and_beside_a_field_are_its_meaning():
    @dataclasses.dataclass
    class Example:
        plain: int = 1
        beside: str = "x"  # on the line
        # above, first line
        # above, second line
        both: float = 0.5  # and beside
        after: bool = False

    comments = ref.field_comments(Example)
    assert comments == {"beside": "on the line",
                        "both": "above, first line above, second line and beside"}
    assert ref.default_text(dataclasses.fields(Example)[1]) == '"x"'
