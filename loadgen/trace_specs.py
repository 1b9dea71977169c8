"""What one ``--trace`` source may name, and how it becomes a ``Workload``.

A source is a shipped trace, a generated workload or a file, optionally followed by options
in brackets:

- ``azure-conv``, ``azure-code``: the shipped Azure 2023 traces (no options);
- ``mooncake``: the shipped Mooncake synthetic trace, with prompt-block hash ids;
  ``mooncake[block=32]`` rescales its 512-token blocks to 32 tokens (prompts 16x shorter,
  same sharing: ``Workload.with_block_tokens``), the way to replay it on a CPU model;
- ``multiturn[conversations=8,turns=4,...]``: the generated multi-turn chat workload, options
  being ``MultiTurnConfig`` fields (``block`` stands for ``block_tokens``);
- a path: a ``.jsonl`` / ``.jsonl.gz`` file is read as a Mooncake trace (``[block=N]`` allowed),
  anything else as a normalized CSV (``arrival_s,input_tokens,output_tokens``).

Commas and ``=`` inside brackets belong to the options, so sources combine with the tenant
syntax: ``mooncake[block=32]=urgent,azure-code=relaxed``.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from flowprefill_ray.workloads import (
    MultiTurnConfig,
    Workload,
    load_builtin,
    load_mooncake,
    load_normalized_csv,
    multiturn_workload,
)

# Built-in trace names the CLI accepts besides a file path, mapped to the shipped trace names
# of ``flowprefill_ray.workloads.load_builtin``.
BUILTIN_TRACE_ALIASES = {
    "azure-conv": "azure_2023_conv",
    "azure-code": "azure_2023_code",
    "mooncake": "mooncake_synthetic",
}
_BLOCK_TRACES = {"mooncake"}  # shipped traces with hash ids, so with a [block=N] option
_MULTITURN = "multiturn"
_SOURCE = re.compile(r"^(?P<name>[^\[\]]+?)\s*(?:\[(?P<options>[^\[\]]*)\])?$")


def split_outside_brackets(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` that is not inside ``[...]``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_source(source: str) -> tuple[str, dict[str, str]]:
    """``(name, options)`` of one source, e.g. ``("mooncake", {"block": "32"})``."""
    match = _SOURCE.match(source.strip())
    if not match:
        raise ValueError(f"trace {source!r} is not NAME or NAME[key=value,...]")
    options: dict[str, str] = {}
    for item in filter(str.strip, (match["options"] or "").split(",")):
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(f"option {item.strip()!r} of trace {source!r} is not key=value")
        options[key] = value
    if match["options"] is not None and not options:
        raise ValueError(f"trace {source!r} has empty brackets")
    return match["name"], options


def _is_mooncake_path(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz"))


def _block_option(source: str, options: dict[str, str]) -> int | None:
    unknown = sorted(set(options) - {"block"})
    if unknown:
        raise ValueError(f"trace {source!r}: unknown options {unknown}; it takes only block=N")
    if "block" not in options:
        return None
    try:
        block = int(options["block"])
    except ValueError:
        block = 0
    if block < 1:
        raise ValueError(f"trace {source!r}: block must be an integer >= 1")
    return block


def _multiturn_config(source: str, options: dict[str, str]) -> MultiTurnConfig:
    fields = {("block_tokens" if k == "block" else k): v for k, v in options.items()}
    try:
        return MultiTurnConfig(**fields)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ValueError(f"trace {source!r}: {problems}") from None


def check_source(source: str) -> None:
    """Raise ``ValueError`` naming the problem if ``source`` names no valid trace (files are
    not opened here: a missing file fails when the trace is loaded)."""
    name, options = parse_source(source)
    if name == _MULTITURN:
        _multiturn_config(source, options)
    elif name in _BLOCK_TRACES or _is_mooncake_path(name):
        _block_option(source, options)
    elif options:
        raise ValueError(f"trace {source!r}: {name!r} takes no options")


def load_source(source: str) -> Workload:
    """The workload ``source`` names (see the module doc)."""
    name, options = parse_source(source)
    if name == _MULTITURN:
        return multiturn_workload(_multiturn_config(source, options))
    check_source(source)
    if name in BUILTIN_TRACE_ALIASES:
        workload = load_builtin(BUILTIN_TRACE_ALIASES[name])
    elif _is_mooncake_path(name):
        workload = load_mooncake(name)
    else:
        return load_normalized_csv(name)
    block = _block_option(source, options)
    return workload if block is None else workload.with_block_tokens(block)
