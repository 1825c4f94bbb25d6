"""Text around the token ids: the prompt (chat template), the streamed output and stop strings.

Chat: the tokenizer's own chat template when it has one; otherwise (tiny byte models, base models
without a template) a plain documented one: each message as ``<role>: <content>\\n`` and then
``assistant:`` to prompt the answer.

Streaming text is decoded from all of a sequence's output ids each time and only the new suffix is
sent; a trailing U+FFFD (an incomplete multi-byte character) and the tail that could still become
a stop string are held back until they are settled, so no client ever sees text that is later
taken back.
"""
from __future__ import annotations

from typing import Any



def encode_text(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    except TypeError:
        return list(tokenizer.encode(text))


def chat_prompt_ids(tokenizer, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of ``messages`` with the generation prompt appended (see the module docstring)."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "apply_chat_template"):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return encode_text(tokenizer, text)


class TextStream:
    """Incremental detokenisation with stop strings for one sequence."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already returned
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; return the text that is now final (may be ""). Sets ``stopped`` when a stop
        string appeared (the text ends before it)."""
        self.ids.append(token)
        self.text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            cut = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                self.stopped = True
                self.text = self.text[:cut]
                return self.flush()
        end = len(self.text) - self.hold
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        """Everything not yet returned (at the end of the sequence)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out

    def final_text(self) -> str:
        return self.text
