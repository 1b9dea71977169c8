"""``--variant NAME=JSON`` as the simulator-side benchmarks take it: a named set of policy
fields merged over the shipped ones, so that several policies run side by side in one run."""

from __future__ import annotations

import json


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
        value = json.loads(fields)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--variant {name}: its fields are not JSON ({error})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"--variant {name}: wants a JSON object of policy fields, got {fields!r}")
    return name, value
