"""Server-sent events as OpenAI streams them: one ``data: <json>`` line per chunk, a blank
line after each, and a final ``data: [DONE]``."""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    """One SSE ``data`` event carrying ``payload`` as compact JSON (no newlines inside)."""
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"
