"""A GGUF's chat template, rendered safely: Jinja's immutable sandbox, a time budget, an output cap.

A chat template is code from a downloaded file. Jinja's sandbox already stops attribute tricks; this
module also stops the two ways a template can still hang or exhaust the process: loops over huge
ranges (`range(100000)` nested) and huge values (`'x' * 10**9`). A template that renders nothing is
an error too (llama.cpp cannot evaluate an empty prompt).
"""

from __future__ import annotations

import operator
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from selfhost.errors import ModelLoadError

RENDER_SECONDS = 2.0  # real templates render in well under a millisecond
MAX_OUTPUT_CHARS = 8_000_000  # far above any context a local model holds
MAX_VALUE_LEN = 1_000_000  # a string or list a template builds with * or +
MAX_RANGE = 100_000


class _Budget(threading.local):
    """The deadline of the render in progress in this thread; checked from every sandbox hook."""

    deadline = float("inf")

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise TimeoutError(f"rendering took longer than {RENDER_SECONDS:g} s")


def _sized(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple) and len(value) > MAX_VALUE_LEN:
        raise OverflowError(f"the template built a value of {len(value)} items (limit {MAX_VALUE_LEN})")
    return value


def _make_environment(budget: _Budget) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
            budget.check()
            if op == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, str | bytes | list | tuple) and isinstance(count, int):
                        if len(seq) * count > MAX_VALUE_LEN:
                            raise OverflowError(f"the template built a value over {MAX_VALUE_LEN} items")
                return operator.mul(left, right)
            if op == "**":
                if isinstance(right, int | float) and abs(right) > 1024:
                    raise OverflowError("the template raised a number to a huge power")
                return operator.pow(left, right)
            return _sized(operator.add(left, right))

        def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N807
            budget.check()
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj: Any, attribute: str) -> Any:
            budget.check()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            budget.check()
            return super().getitem(obj, argument)

    def limited_range(*args: int) -> Iterator[int]:
        numbers = range(*args)
        if len(numbers) > MAX_RANGE:
            raise OverflowError(f"the template asked for a range of {len(numbers)} numbers")
        for i, n in enumerate(numbers):
            if i % 256 == 0:
                budget.check()
            yield n

    def raise_exception(message: str) -> None:
        from jinja2.exceptions import TemplateError

        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return time.strftime(fmt)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **kw: Any) -> str:
        """As Hugging Face renders it: plain text (Jinja's own returns Markup, whose `+` escapes `<`)."""
        import json

        sort_keys = kw.get("sort_keys", False)
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env.globals.update(range=limited_range, raise_exception=raise_exception, strftime_now=strftime_now)
    env.filters["tojson"] = tojson
    return env


class ChatTemplate:
    """Compile once (a broken template is one clear error), render many times within limits."""

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError

        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self._budget = _Budget()
        try:
            self._template = _make_environment(self._budget).from_string(source)
        except (TemplateError, RecursionError, ValueError) as exc:
            raise ModelLoadError(f"the model's chat template is invalid: {exc}") from exc

    @property
    def supports_tools(self) -> bool:
        """Does the template render a `tools` list (so the model was trained to call tools)?"""
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The prompt text. Raises ModelLoadError when the template fails, hangs or renders nothing.

        `extra`: more template variables (a think switch: `enable_thinking`, `reasoning_effort`)."""
        variables: dict[str, Any] = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            variables["tools"] = tools
        variables.update(extra or {})
        self._budget.deadline = time.monotonic() + RENDER_SECONDS
        parts: list[str] = []
        size = 0
        try:
            for piece in self._template.generate(**variables):
                size += len(piece)
                if size > MAX_OUTPUT_CHARS:
                    raise OverflowError(f"the template rendered more than {MAX_OUTPUT_CHARS} characters")
                self._budget.check()
                parts.append(piece)
        except Exception as exc:  # TemplateError, sandbox violations, our limits, the template's bugs
            raise ModelLoadError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._budget.deadline = float("inf")
        prompt = "".join(parts)
        if not prompt.strip():
            raise ModelLoadError("the model's chat template rendered an empty prompt")
        return prompt
