"""A hostile user's probe of a running FlowPrefill server (issue 15's cases), with a verdict.

    .venv/bin/python scripts/hostile_probe.py --url http://127.0.0.1:8000 \
        --model SmolLM2-135M-Instruct --metrics-url http://127.0.0.1:8080/metrics \
        --out docs/results/hostile_probe.json

Sends, against the live server only (loopback in every documented use):

1. poisoned batches: rounds of six ordinary requests sent together with one carrying
   ``seed: 2**64`` (once it failed the whole prefill batch: five innocent 500s a round);
2. every bad input of docs/RELIABILITY.md that is not a plain validation case (huge integers,
   non-boolean booleans, lone surrogates, JSON nested 50,000 deep, an unknown route);
3. a body that never finishes arriving (answered 408 after the server's read timeout);
4. a burst of concurrent requests (overload: 200 or 429 with Retry-After, never a 5xx).

Then checks: no innocent request failed, no 5xx at all, every error body is the OpenAI error
object with a request id, no body carries internals (a traceback, ANSI colours, pids, actor ids,
source paths), and - with ``--metrics-url`` (Ray's metrics port) - every prefill worker holds
0 bytes once idle. Prints the verdict per check, writes JSON, exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

INTERNALS = re.compile(
    r"Traceback|\x1b\[|\bpid[=:]|actor_id|ActorID|site-packages|File \"/|ray\.exceptions"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--api-key", default=None)
    p.add_argument("--metrics-url", default=None, help="Ray's metrics endpoint (held bytes)")
    p.add_argument("--rounds", type=int, default=3, help="poisoned-batch rounds")
    p.add_argument("--burst", type=int, default=300, help="concurrent requests in the burst")
    p.add_argument("--slow-body-wait-s", type=float, default=45.0)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def _hostile_bodies(model: str) -> dict[str, tuple[str, bytes]]:
    def body(**fields) -> bytes:
        return json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4, **fields}).encode()

    deep = b'{"model": "%s", "prompt": "hi", "x": ' % model.encode()
    return {
        "seed 2**64": ("/v1/completions", body(seed=2**64)),
        "seed -2**63-1": ("/v1/completions", body(seed=-(2**63) - 1)),
        "max_tokens 10**40": ("/v1/completions", body(max_tokens=10**40)),
        "temperature 10**40": ("/v1/completions", body(temperature=10**40)),
        "ignore_eos 'false'": ("/v1/completions", body(ignore_eos="false")),
        "stream 0": ("/v1/completions", body(stream=0)),
        "lone surrogate prompt": (
            "/v1/completions",
            b'{"model": "%s", "prompt": "a\\ud800b"}' % model.encode(),
        ),
        "lone surrogate chat": (
            "/v1/chat/completions",
            b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}'
            % model.encode(),
        ),
        "JSON 50,000 deep": ("/v1/completions", deep + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        "unknown route": ("/v1/embeddings", body()),
    }


async def _poisoned_rounds(http: httpx.AsyncClient, model: str, rounds: int) -> list[dict]:
    results = []
    for r in range(rounds):
        innocent = [
            http.post(
                "/v1/completions",
                json={
                    "model": model,
                    "prompt": f"Story {r}.{i}:",
                    "max_tokens": 8,
                    "seed": 7 + i,
                    "temperature": 0.8,
                },
            )  # fmt: skip
            for i in range(6)
        ]
        culprit = http.post("/v1/completions", json={
            "model": model, "prompt": "poison", "max_tokens": 8, "seed": 2**64})  # fmt: skip
        *ok, bad = await asyncio.gather(*innocent, culprit)
        results.append({"innocent": [a.status_code for a in ok], "culprit": bad.status_code,
                         "bodies": [a.text[:400] for a in (*ok, bad)]})  # fmt: skip
    return results


def _slow_body(url: str, wait_s: float) -> dict:
    """Announce 1000 bytes, send 20, wait for the server's answer."""
    parsed = urlparse(url)
    started = time.monotonic()
    with socket.create_connection((parsed.hostname, parsed.port or 80), timeout=wait_s) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: probe\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": "never-en')  # fmt: skip
        answer = b""
        try:
            while b"\r\n\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        except TimeoutError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    return {"status": status, "seconds": round(time.monotonic() - started, 2)}


async def _burst(http: httpx.AsyncClient, model: str, n: int) -> list[httpx.Response]:
    return await asyncio.gather(*(
        http.post("/v1/completions", json={"model": model, "prompt": f"Burst request {i}",
                                           "max_tokens": 4})
        for i in range(n)
    ), return_exceptions=True)  # fmt: skip


def _held_bytes(metrics_url: str) -> dict[str, float]:
    text = httpx.get(metrics_url, timeout=10).text
    held = {}
    for line in text.splitlines():
        if line.startswith("ray_flowprefill_prefill_held_bytes{"):
            worker = re.search(r'worker_id="([^"]+)"', line)
            held[worker.group(1) if worker else "?"] = float(line.rsplit(" ", 1)[1])
    return held


async def probe(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.burst + 10)
    async with httpx.AsyncClient(base_url=args.url, timeout=300, headers=headers,
                                 limits=limits) as http:  # fmt: skip
        rounds = await _poisoned_rounds(http, args.model, args.rounds)
        hostile = {}
        for name, (path, content) in _hostile_bodies(args.model).items():
            answer = await http.post(
                path, content=content, headers={"Content-Type": "application/json"}
            )
            hostile[name] = {"status": answer.status_code, "body": answer.text[:400]}
        slow = await asyncio.to_thread(_slow_body, args.url, args.slow_body_wait_s)
        burst = await _burst(http, args.model, args.burst)
    statuses = [b.status_code if isinstance(b, httpx.Response) else None for b in burst]
    bodies = [b.text for b in burst if isinstance(b, httpx.Response) and b.status_code != 200]
    all_errors = [h["body"] for h in hostile.values()] + bodies
    all_errors += [text for r in rounds for text in r["bodies"][-1:]]
    checks = {
        "no innocent request failed": all(s == 200 for r in rounds for s in r["innocent"]),
        "the poisoned request got a 4xx": all(400 <= r["culprit"] < 500 for r in rounds),
        "every hostile input got a 4xx": all(400 <= h["status"] < 500 for h in hostile.values()),
        "no 5xx anywhere": not any(s is not None and s >= 500 for s in statuses)
        and not any(h["status"] >= 500 for h in hostile.values()),
        "every burst request answered": all(s is not None for s in statuses),
        "error bodies are OpenAI errors with a request id": all(
            _is_error_object(text) for text in all_errors
        ),
        "no internals in any body": not any(INTERNALS.search(text) for text in all_errors),
        "a body that never finishes gets 408": slow["status"] == 408,
    }
    held = None
    if args.metrics_url:
        deadline = time.monotonic() + 60
        while True:  # metrics are exported every few seconds; the gauge follows the last unit
            held = _held_bytes(args.metrics_url)
            if (held and not any(held.values())) or time.monotonic() > deadline:
                break
            await asyncio.sleep(2)
        checks["every prefill worker holds 0 bytes once idle"] = bool(held) and not any(
            held.values()
        )
    return {
        "url": args.url,
        "checks": checks,
        "poisoned_rounds": [{k: v for k, v in r.items() if k != "bodies"} for r in rounds],
        "hostile": hostile,
        "slow_body": slow,
        "burst_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)},
        "held_bytes": held,
    }


def _is_error_object(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(error.get("message")) and bool(error.get("request_id"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(probe(args))
    for name, ok in report["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print("burst:", report["burst_statuses"], "slow body:", report["slow_body"])
    if args.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        from provenance import write_report

        write_report(args.out, __file__, argv, "hostile_probe", **report)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
