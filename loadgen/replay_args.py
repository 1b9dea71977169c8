"""The command-line flags of a trace replay, shared by every command that replays one.

``python -m loadgen``, the demo (``python -m flowprefill_ray demo``) and
``benchmarks/live_policies.py`` all turn the same flags into a ``ReplayConfig``; they differ only
in their defaults (a CPU demo wants a short, scaled-down slice; the load generator the trace as
is). ``add_replay_arguments`` declares the flags with a command's defaults, ``replay_config``
validates what was parsed. Defaults are given by ``ReplayConfig`` field name
(``add_replay_arguments(parser, max_requests=48, prompt_scale=0.1)``); whatever a command does
not set keeps ``ReplayConfig``'s own default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from .config import ReplayConfig

# The flag each ReplayConfig field is set by: field -> (flag, type, help). The argparse dest is
# the field name, so ``replay_config`` needs no second mapping. ``token_id_low`` / ``_high`` are
# one two-value flag and handled apart.
_FLAGS: dict[str, tuple[str, type, str]] = {
    "trace": (
        "--trace",
        str,
        "azure-conv, azure-code, mooncake[block=N] (prefix-sharing trace, blocks rescaled to "
        "N tokens), multiturn[conversations=C,turns=T,...] (generated chat), a normalized CSV "
        "or Mooncake .jsonl[.gz] path, or TRACE=CLASS,TRACE=CLASS tenants",
    ),
    "start_s": ("--start", float, "seconds of the trace to skip"),
    "rate_scale": ("--rate-scale", float, "arrival-rate multiplier"),
    "prompt_scale": ("--prompt-scale", float, "prompt-length multiplier"),
    "max_prompt_tokens": ("--max-prompt-tokens", int, "cap on prompt tokens (after scaling)"),
    "max_output_tokens": ("--max-output-tokens", int, "cap on output tokens"),
    "max_requests": ("--requests", int, "most requests sent"),
    "duration_s": ("--duration", float, "seconds during which requests are sent"),
    "drain_s": ("--drain", float, "seconds in-flight requests get after the last send"),
    "seed": ("--seed", int, "fixes prompt token ids and the classes of a classless trace"),
}
_TOKEN_ID_FIELDS = ("token_id_low", "token_id_high")

# The reshaped slice the CPU commands (the demo, benchmarks/live_policies.py) replay by default:
# prompts at a tenth of the trace's (capped) and short answers, so SmolLM2 on two cores keeps up
# with the trace's arrival pattern; 120 s of sending, 30 s for stragglers.
CPU_SLICE_DEFAULTS: dict[str, Any] = dict(
    prompt_scale=0.1, max_prompt_tokens=384, max_output_tokens=8, duration_s=120.0, drain_s=30.0
)

# Flags once spelled differently and still advertised somewhere: old flag -> field.
_DEPRECATED_ALIASES = {"--max-requests": "max_requests"}


class _DeprecatedAlias(argparse.Action):
    """Stores the value under the new flag's dest and says on stderr which flag to use."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str, **kw: Any):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"warning: {option_string} is deprecated, use {self.new_flag}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_replay_arguments(
    parser: argparse.ArgumentParser,
    *,
    omit: Sequence[str] = (),
    **defaults: Any,
) -> argparse._ArgumentGroup:
    """Declare the replay flags on ``parser`` (in a "replay" group, which is returned).

    ``defaults``: this command's default per ``ReplayConfig`` field name (``token_id_low`` and
    ``token_id_high`` for ``--token-id-range``). ``omit``: fields the command sets itself and
    must not offer as a flag (a goodput search chooses ``rate_scale``); ``replay_config``
    then leaves them at ``ReplayConfig``'s default. A name that is no replay field raises
    ``TypeError`` (a typo would otherwise silently keep the generic default).
    """
    known = set(_FLAGS) | set(_TOKEN_ID_FIELDS)
    unknown = sorted((set(defaults) | set(omit)) - known)
    if unknown:
        raise TypeError(f"not ReplayConfig fields with a flag: {unknown}; known: {sorted(known)}")
    fields = ReplayConfig.model_fields

    def default(field: str) -> Any:
        return defaults.get(field, fields[field].default)

    group = parser.add_argument_group("replay")
    for field, (flag, kind, text) in _FLAGS.items():
        if field in omit:
            continue
        value = default(field)
        group.add_argument(
            flag,
            dest=field,
            type=kind,
            default=value,
            metavar=flag[2:].upper().replace("-", "_"),  # the flag's name, not the field's
            help=f"{text} (default: {value})",
        )
    if not set(_TOKEN_ID_FIELDS) & set(omit):
        low, high = (default(f) for f in _TOKEN_ID_FIELDS)
        group.add_argument(
            "--token-id-range",
            dest="token_id_range",
            type=int,
            nargs=2,
            default=(low, high),
            metavar=("LOW", "HIGH"),
            help=f"prompt token ids are drawn from [LOW, HIGH) (default: {low} {high})",
        )
    for old, field in _DEPRECATED_ALIASES.items():
        if field not in omit:
            group.add_argument(
                old,
                dest=field,
                type=_FLAGS[field][1],
                action=_DeprecatedAlias,
                new_flag=_FLAGS[field][0],
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    return group


def replay_config(args: argparse.Namespace) -> ReplayConfig:
    """The validated ``ReplayConfig`` of flags declared by ``add_replay_arguments``.

    Raises pydantic's ``ValidationError`` (it names the field) on a bad value.
    """
    values = {field: getattr(args, field) for field in _FLAGS if hasattr(args, field)}
    if hasattr(args, "token_id_range"):
        values.update(zip(_TOKEN_ID_FIELDS, args.token_id_range, strict=True))
    return ReplayConfig(**values)
