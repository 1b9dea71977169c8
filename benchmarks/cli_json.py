"""JSON on a benchmark's command line: fields merged over the shipped config (``--policy-json``,
``--runtime-json``, ``--our-policy-json``) and ``--variant NAME=JSON``, named sets of policy
fields run side by side. One parser, so that every script refuses the same malformed input
with the same message."""

from __future__ import annotations

import json


def json_object(text: str, what: str) -> dict:
    """``text`` as a JSON object; ``ValueError`` naming ``what`` (the flag) otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object of fields, got {text!r}")
    return value


def parse_variants(texts: list[str]) -> dict[str, dict]:
    """``["NAME=JSON", ...]`` -> ``{name: policy fields}``, in the order given. A malformed
    entry or a repeated name stops the script with a message naming it."""
    variants: dict[str, dict] = {}
    for text in texts:
        name, fields = parse_variant(text)
        if name in variants:
            raise SystemExit(f"--variant {name} is given twice")
        variants[name] = fields
    return variants


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=JSON`` -> (name, policy fields)."""
    name, sep, fields = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--variant wants NAME=JSON, got {text!r}")
    try:
        return name, json_object(fields, f"--variant {name}")
    except ValueError as error:
        raise SystemExit(str(error)) from None
