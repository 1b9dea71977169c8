"""Fetch the server's scheduler timeline after a replay and keep it beside the results.

FlowPrefill serves ``GET /v1/flowprefill/timeline?last=N`` (what happened to each recent
request and why each miss was late); other servers (vLLM, SGLang) have no such route, and a
replay against them simply has no ``timeline.json``. HTTP only, like the rest of the load
generator.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from .config import EndpointConfig

TIMELINE_FILE = "timeline.json"


def fetch_timeline(endpoint: EndpointConfig, last: int) -> dict | None:
    """The server's timeline of its ``last`` most recent requests, or None when the server
    has none (404) or cannot answer."""
    base = endpoint.base_url.removesuffix("/v1")
    headers = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    try:
        response = httpx.get(
            f"{base}/v1/flowprefill/timeline",
            params={"last": max(1, min(last, 100_000))},
            headers=headers,
            timeout=60.0,
        )
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return response.json()


def save_timeline(endpoint: EndpointConfig, out_dir: str | Path, last: int) -> Path | None:
    """Write the server's timeline to ``out_dir/timeline.json``; None if it has none."""
    timeline = fetch_timeline(endpoint, last)
    if timeline is None:
        return None
    path = Path(out_dir) / TIMELINE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(timeline, indent=1))
    return path
