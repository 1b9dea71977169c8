"""Incremental detokenization: text deltas for streamed tokens.

Deltas come from decoding the whole output so far and handing out what is new. Two tails are
held back until the next token: a trailing replacement character (half of a multi-byte
character split across tokens) and the last ``len(longest stop string) - 1`` characters, which
could turn out to be the start of a stop string (stop strings are never shown). When the output
ends, ``finish`` hands out the rest of the final text decided by the model package's
``StopChecker`` (which owns the stopping rules, so the runtime stops exactly like ``generate``).
The prefill worker (first token) and the decode worker (the rest) run this on the same token
ids, so their deltas join up; both get theirs from ``OutputRules`` (output_rules.py).
"""

from __future__ import annotations


class Detokenizer:
    """Turns one request's output token ids into text deltas."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.emitted = ""  # text already handed out

    def add(self, token_id: int) -> str:
        """Append one output token; returns the text that is now safe to show."""
        self.token_ids.append(int(token_id))
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        safe = len(text) - self._hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._advance(text, safe)

    def finish(self, final_text: str | None) -> str:
        """The rest of ``final_text`` (the whole output's text, stop string cut off)."""
        if final_text is None:
            final_text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        return self._advance(final_text, len(final_text))

    def _advance(self, text: str, upto: int) -> str:
        # If earlier text changed under a later token (rare merges), nothing more is shown
        # rather than a corrupted stream.
        if upto <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        delta = text[len(self.emitted) : upto]
        self.emitted += delta
        return delta
