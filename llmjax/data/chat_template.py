"""Chat templates rendered in jinja2's immutable sandbox.

A template comes from a downloaded tokenizer_config.json (or chat_template.jinja)
or from GGUF metadata: it is untrusted code. As transformers does, it runs in an
`ImmutableSandboxedEnvironment` (no dunder attributes, no access to module
globals, no mutation of the objects we pass in) with only the helpers real
templates use: raise_exception, strftime_now, a JSON `tojson`, loop controls,
`namespace` without underscore names and a no-op `{% generation %}` block.
Any failure (syntax, sandbox violation, undefined call, raise_exception) is a
ConversionError naming where the template came from.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

from llmjax.errors import ConversionError

MAX_REPEAT = 1_000_000  # longest string/list a template may build by repetition
MAX_POWER_BITS = 100_000  # largest integer power a template may compute


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            block = jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body)
            return block.set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # Underscore names on a namespace are a way towards CPython internals: refused.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"underscore-prefixed namespace attribute {name!r}")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson HTML-escapes; templates expect plain JSON (as transformers renders)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class Environment(ImmutableSandboxedEnvironment):
        # `'x' * 10**10` or `2 ** 10**9` would exhaust memory or time before any output.
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and (
                    abs(right) > 1024 or left.bit_length() * abs(right) > MAX_POWER_BITS):
                raise jinja2.exceptions.SecurityError(f"power {left} ** {right} is too large")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and \
                            len(seq) * n > MAX_REPEAT:
                        raise jinja2.exceptions.SecurityError(
                            f"repeating a sequence {n} times exceeds {MAX_REPEAT:,} items")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True,
                      extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       namespace=Namespace, dict=lambda *a, **k: dict(*a, **k))
    return env


def render_chat_template(template: str, source: str, messages: list[dict],
                         add_generation_prompt: bool = True, **variables: Any) -> str:
    """The text of `messages` under `template` (from `source`, named in errors).

    `variables` are what transformers passes too: bos_token, eos_token, ... ."""
    import jinja2

    if not isinstance(template, str):
        raise ConversionError(f"{source}: chat_template is {type(template).__name__}, "
                              f"not a template string")
    # Only plain data reaches the template: no objects whose methods could be reached.
    data = json.loads(json.dumps({"messages": messages, **variables}))
    try:
        compiled = _environment().from_string(template)
        return compiled.render(add_generation_prompt=add_generation_prompt, **data)
    except jinja2.exceptions.SecurityError as err:
        raise ConversionError(f"{source}: the chat template tried something the sandbox "
                              f"forbids ({err}); it was not run further. Use a model whose "
                              f"template only formats messages") from None
    except jinja2.exceptions.TemplateError as err:
        raise ConversionError(f"{source}: the chat template failed to render "
                              f"({type(err).__name__}: {err}); fix or replace the template") \
            from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, ZeroDivisionError,
            OverflowError, RecursionError) as err:
        raise ConversionError(f"{source}: the chat template failed to render "
                              f"({type(err).__name__}: {err}); fix or replace the template") \
            from None
