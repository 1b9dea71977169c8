"""Writing a run's results: ``summary.json`` + per-request ``requests.json`` and ``requests.csv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .record import RequestRecord
from .runner import RunResult
from .summary import summarize


def write_results(
    result: RunResult, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the run into ``out_dir`` (created if needed); returns the paths written.

    ``results.json`` holds the configs, the summary and every request (with token timestamps);
    ``requests.csv`` one row per request (columns ``RequestRecord.CSV_FIELDS``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(result)
    document = {
        "endpoint": result.endpoint.model_dump(exclude={"api_key"}),
        "replay": result.replay.model_dump(),
        "summary": summary,
        **(extra or {}),
        "requests": [r.to_json() for r in result.records],
    }
    json_path = out / "results.json"
    json_path.write_text(json.dumps(document, indent=1))
    csv_path = out / "requests.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(RequestRecord.CSV_FIELDS))
        writer.writeheader()
        for record in result.records:
            writer.writerow(record.to_row())
    return {"json": json_path, "csv": csv_path}
