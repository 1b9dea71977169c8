"""Readers for public LLM request traces, each returning a ``Workload``.

Formats (column names as the public files spell them):

- Azure LLM inference trace 2023, raw: ``TIMESTAMP,ContextTokens,GeneratedTokens`` with
  timestamps like ``2023-11-16 18:15:46.6805900`` (7 fractional digits).
- Normalized CSV (what ``data/azure_2023_*.csv`` ship as): ``arrival_s,input_tokens,output_tokens``.
- BurstGPT CSV: ``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``
  (timestamp in seconds). A row whose ``Response tokens`` is 0 is a failed request (BurstGPT
  logs failures that way); it is skipped and counted in ``Workload.skipped_rows``. If the file
  has a ``Status``/``status`` column, rows whose status is not a success are skipped too.
- Mooncake JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.
- Qwen-Bailian JSONL: ``{"timestamp": s, "input_length", "output_length", "type"}``; ``type``
  (text/image/search/file) maps to an SLO class through ``BailianConfig``.

All loaders shift time so that the earliest arrival is 0 s and sort by arrival. A row that
cannot be read raises ``TraceFormatError`` naming the file and the line. A file whose name ends
in ``.gz`` is read through gzip.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict

from .trace import TraceFormatError, TraceRecord, Workload

# Shipped trace name -> (file in workloads/data, its format).
_BUILTIN_FILES = {
    "azure_2023_conv": ("azure_2023_conv.csv", "normalized"),
    "azure_2023_code": ("azure_2023_code.csv", "normalized"),
    "mooncake_synthetic": ("mooncake_synthetic.jsonl.gz", "mooncake"),
}
BUILTIN_TRACES = tuple(_BUILTIN_FILES)
MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash_ids block in Mooncake traces
BAILIAN_BLOCK_TOKENS = 16  # ... and in Qwen-Bailian traces


def _open_text(path: str) -> IO[str]:
    """The file as text, gunzipped on the fly when its name ends in ``.gz``."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, newline="", encoding="utf-8")


def _trace_name(path: str | Path) -> str:
    """The file name without its extensions (``x.jsonl.gz`` -> ``x``)."""
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".csv"):
        name = name.removesuffix(suffix)
    return name


def _int_field(row: dict[str, Any], key: str, path: str, line: int) -> int:
    if key not in row or row[key] in (None, ""):
        raise TraceFormatError(path, line, f"missing field {key!r}")
    value = row[key]
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, f"field {key!r} is not a number: {value!r}") from None
    if as_float != int(as_float) or as_float < 0:
        raise TraceFormatError(
            path, line, f"field {key!r} must be a non-negative integer, got {value!r}"
        )
    return int(as_float)


def _float_field(row: dict[str, Any], key: str, path: str, line: int) -> float:
    if key not in row or row[key] in (None, ""):
        raise TraceFormatError(path, line, f"missing field {key!r}")
    try:
        value = float(row[key])
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, f"field {key!r} is not a number: {row[key]!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TraceFormatError(path, line, f"field {key!r} is not finite: {row[key]!r}")
    return value


def _csv_rows(path: str | Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; line numbers count the header as line 1."""
    path = str(path)
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise TraceFormatError(path, 1, f"header lacks columns {missing}; found {header}")
        reader.fieldnames = header
        for row in reader:
            yield reader.line_num, row


def _jsonl_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    path = str(path)
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceFormatError(path, line_no, f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TraceFormatError(path, line_no, "expected a JSON object per line")
            yield line_no, row


def _rebased(
    name: str, records: list[TraceRecord], skipped: int = 0, block_tokens: int | None = None
) -> Workload:
    if records:
        t0 = min(r.arrival_s for r in records)
        if t0 != 0:
            records = [
                TraceRecord(
                    r.arrival_s - t0, r.prompt_tokens, r.output_tokens, r.slo_class, r.hash_ids
                )
                for r in records
            ]
    return Workload(name, tuple(records), skipped, block_tokens)


# ----------------------------------------------------------------------------- Azure 2023


def parse_azure_timestamp(text: str) -> float:
    """Seconds since the epoch (naive timestamps read as UTC) of an Azure trace TIMESTAMP.

    Python's ``fromisoformat`` rejects the trace's 7 fractional digits, so the fraction is
    parsed separately.
    """
    text = text.strip()
    base, _, frac = text.partition(".")
    tz = ""
    for sep in ("+", "Z"):
        if sep in frac:
            frac, _, rest = frac.partition(sep)
            tz = sep + rest
    stamp = datetime.fromisoformat(base.replace("T", " ") + (tz if tz != "Z" else "+00:00"))
    if stamp.tzinfo is None:
        seconds = (stamp - datetime(1970, 1, 1)).total_seconds()
    else:
        seconds = stamp.timestamp()
    if frac:
        if not frac.isdigit():
            raise ValueError(f"bad fractional seconds in {text!r}")
        seconds += int(frac) / 10 ** len(frac)
    return seconds


def load_azure_raw(path: str | Path) -> Workload:
    """Azure LLM inference trace 2023 as published (``TIMESTAMP,ContextTokens,GeneratedTokens``)."""
    path = str(path)
    records = []
    for line, row in _csv_rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            t = parse_azure_timestamp(row["TIMESTAMP"] or "")
        except ValueError as e:
            raise TraceFormatError(
                path, line, f"bad TIMESTAMP {row['TIMESTAMP']!r} ({e})"
            ) from None
        records.append(
            TraceRecord(
                t,
                _int_field(row, "ContextTokens", path, line),
                _int_field(row, "GeneratedTokens", path, line),
            )
        )
    return _rebased(_trace_name(path), records)


def load_normalized_csv(path: str | Path) -> Workload:
    """``arrival_s,input_tokens,output_tokens`` CSV (optional ``slo_class`` column)."""
    path = str(path)
    records = []
    for line, row in _csv_rows(path, ("arrival_s", "input_tokens", "output_tokens")):
        cls = (row.get("slo_class") or "").strip() or None
        records.append(
            TraceRecord(
                _float_field(row, "arrival_s", path, line),
                _int_field(row, "input_tokens", path, line),
                _int_field(row, "output_tokens", path, line),
                cls,
            )
        )
    return _rebased(_trace_name(path), records)


def load_builtin(name: str) -> Workload:
    """One of the traces shipped in ``workloads/data`` (see data/README.md for sources and
    licences): ``azure_2023_conv`` and ``azure_2023_code``, the first hour of the Azure LLM
    inference trace 2023, normalized; ``mooncake_synthetic``, the Mooncake synthetic trace with
    its prompt-block ``hash_ids`` (512-token blocks, about 64 % of them repeating a prefix)."""
    if name not in _BUILTIN_FILES:
        raise ValueError(f"unknown built-in trace {name!r}; available: {', '.join(BUILTIN_TRACES)}")
    file_name, fmt = _BUILTIN_FILES[name]
    ref = resources.files("flowprefill_ray.workloads") / "data" / file_name
    with resources.as_file(ref) as path:
        workload = load_trace(path, fmt)
    return Workload(name, workload.records, workload.skipped_rows, workload.block_tokens)


# ----------------------------------------------------------------------------- BurstGPT

_SUCCESS_STATUSES = {"", "success", "succeeded", "ok", "200", "completed", "true", "1"}


def load_burstgpt(path: str | Path) -> Workload:
    """BurstGPT CSV. Failed requests (0 response tokens, or a non-success ``Status``) are skipped
    and counted in ``skipped_rows``: they never produced a prefill the client waited on."""
    path = str(path)
    records = []
    skipped = 0
    for line, row in _csv_rows(path, ("Timestamp", "Request tokens", "Response tokens")):
        status = (row.get("Status") or row.get("status") or "").strip().lower()
        response = _int_field(row, "Response tokens", path, line)
        if response == 0 or status not in _SUCCESS_STATUSES:
            skipped += 1
            continue
        records.append(
            TraceRecord(
                _float_field(row, "Timestamp", path, line),
                _int_field(row, "Request tokens", path, line),
                response,
            )
        )
    return _rebased(_trace_name(path), records, skipped)


# ----------------------------------------------------------------------------- Mooncake


def load_mooncake(path: str | Path, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Workload:
    """Mooncake JSONL trace (``timestamp`` in milliseconds); ``hash_ids`` kept on each record,
    ``block_tokens`` (tokens per hash id) on the workload."""
    path = str(path)
    records = []
    for line, row in _jsonl_rows(path):
        hash_ids = row.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
            raise TraceFormatError(path, line, "field 'hash_ids' must be a list of integers")
        records.append(
            TraceRecord(
                _float_field(row, "timestamp", path, line) / 1000.0,
                _int_field(row, "input_length", path, line),
                _int_field(row, "output_length", path, line),
                None,
                tuple(hash_ids),
            )
        )
    return _rebased(_trace_name(path), records, block_tokens=block_tokens)


# ----------------------------------------------------------------------------- Qwen-Bailian


class BailianConfig(BaseModel):
    """How a Qwen-Bailian request ``type`` becomes an SLO class.

    ``unknown_type``: ``error`` raises on a type missing from the map; ``unassigned`` leaves
    the class None so that an ``SLOAssigner`` can fill it in later.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type_to_slo_class: dict[str, str] = {
        "text": "text",
        "image": "image",
        "search": "search",
        "file": "file",
    }
    unknown_type: Literal["error", "unassigned"] = "error"


def load_bailian(path: str | Path, config: BailianConfig | None = None) -> Workload:
    """Qwen-Bailian JSONL trace (``timestamp`` in seconds, ``type`` -> SLO class)."""
    config = config or BailianConfig()
    path = str(path)
    records = []
    for line, row in _jsonl_rows(path):
        req_type = row.get("type")
        slo_class = config.type_to_slo_class.get(str(req_type)) if req_type is not None else None
        if slo_class is None and config.unknown_type == "error":
            known = ", ".join(sorted(config.type_to_slo_class))
            raise TraceFormatError(
                path, line, f"request type {req_type!r} has no SLO class (known: {known})"
            )
        hash_ids = row.get("hash_ids", [])
        records.append(
            TraceRecord(
                _float_field(row, "timestamp", path, line),
                _int_field(row, "input_length", path, line),
                _int_field(row, "output_length", path, line),
                slo_class,
                tuple(hash_ids) if isinstance(hash_ids, list) else (),
            )
        )
    has_blocks = any(r.hash_ids for r in records)
    return _rebased(
        _trace_name(path), records, block_tokens=BAILIAN_BLOCK_TOKENS if has_blocks else None
    )


TraceFormat = Literal["azure_raw", "normalized", "burstgpt", "mooncake", "bailian"]

_LOADERS = {
    "azure_raw": load_azure_raw,
    "normalized": load_normalized_csv,
    "burstgpt": load_burstgpt,
    "mooncake": load_mooncake,
    "bailian": load_bailian,
}


def load_trace(path: str | Path, fmt: TraceFormat) -> Workload:
    """Load ``path`` in the named format (see the module docstring for the formats)."""
    if fmt not in _LOADERS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(_LOADERS)}")
    return _LOADERS[fmt](path)
