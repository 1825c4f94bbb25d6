"""Known harmless messages of the libraries we call, dropped before a newcomer sees them.

Why: every command used to open with transformers' tokenizer ``legacy`` notice (it fires for every
tokenizer converted from GGUF, and says itself that it can be ignored there) and with a
``torch_dtype`` deprecation raised inside optimum's export, neither of which the user can act on.
Only the exact messages listed here are dropped, by a filter on the logger that emits them
(attached before transformers is imported, at no import cost); every other warning still shows,
and ``sparse-runtime -v`` shows these too.
"""
from __future__ import annotations

import logging

# (emitting logger, start of the message): the message, not the logger, is what is judged harmless
HARMLESS: tuple[tuple[str, str], ...] = (
    ("transformers.models.llama.tokenization_llama_fast", "You are using the default legacy behaviour"),
    ("transformers.models.llama.tokenization_llama", "You are using the default legacy behaviour"),
    ("transformers.configuration_utils", "`torch_dtype` is deprecated! Use `dtype` instead!"),
    ("transformers.modeling_utils", "`torch_dtype` is deprecated! Use `dtype` instead!"),
)


class _DropHarmless(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def install() -> None:
    """Drop the :data:`HARMLESS` messages (idempotent). A logger's own filters run before its
    handlers and before propagation, so attaching to the emitting logger is enough."""
    if _installed:
        return
    by_logger: dict[str, list[str]] = {}
    for name, prefix in HARMLESS:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        lg, f = logging.getLogger(name), _DropHarmless(tuple(prefixes))
        lg.addFilter(f)
        _installed.append((lg, f))


def uninstall() -> None:
    """Show the :data:`HARMLESS` messages again (``-v``, tests)."""
    while _installed:
        lg, f = _installed.pop()
        lg.removeFilter(f)
