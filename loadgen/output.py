"""Writing a run's results: ``summary.json`` + per-request ``requests.json`` and ``requests.csv``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from .result import RequestResult
from .runner import RunResult
from .summary import summarize


def write_results(
    result: RunResult, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write the run into ``out_dir`` (created if needed); returns the paths written.

    ``results.json`` holds the configs, the summary and every request (with token timestamps);
    ``requests.csv`` one row per request (columns ``RequestResult.CSV_FIELDS``).
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
        writer = csv.DictWriter(fh, fieldnames=list(RequestResult.CSV_FIELDS))
        writer.writeheader()
        for record in result.records:
            writer.writerow(record.to_row())
    return {"json": json_path, "csv": csv_path}


def load_records(json_path: str | Path) -> list[RequestResult]:
    """The per-request records of a ``results.json`` written by ``write_results`` (to re-plot
    or re-analyse a run without repeating it)."""
    document = json.loads(Path(json_path).read_text())
    return [
        RequestResult(
            request_id=r["request_id"],
            slo_class=r["slo_class"],
            ttft_slo_s=r["ttft_slo_s"],
            prompt_tokens=r["prompt_tokens"],
            max_output_tokens=r["max_output_tokens"],
            scheduled_s=r["scheduled_s"],
            sent_s=r["sent_s"],
            first_token_s=r["first_token_s"],
            end_s=r["end_s"],
            token_times_s=list(r["token_times_s"]),
            sent_wall_s=r.get("sent_wall_s"),
            output_tokens=r["output_tokens"],
            status=r["status"],
            http_status=r["http_status"],
            error=r["error"],
            server=dict(r["server"]),
        )
        for r in document["requests"]
    ]
