"""The load generator against a real local HTTP server that streams like an OpenAI endpoint.

The server (FastAPI + uvicorn on 127.0.0.1, a free port) answers /v1/completions with SSE
chunks. Its timing is known: the first token comes after ``PREFILL_S_PER_TOKEN`` seconds per
prompt token, then one token every ``ITL_S`` seconds, ``max_tokens`` tokens in all. Two model
names change its behaviour: ``busy`` answers 429, ``endless`` streams until the client leaves,
``serial`` runs one prefill at a time (a queue forms when requests arrive faster than that).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import threading
import time
from pathlib import Path

import pytest
from conftest_ray import free_port
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from local_http import serving
from pydantic import ValidationError
from repo_scripts import load_script

from flowprefill_ray.demos.serving import build_parser as demo_parser
from flowprefill_ray.scheduling.slo import SLOConfig
from loadgen import (
    EndpointConfig,
    PlannedRequest,
    ReplayConfig,
    RequestResult,
    run_open_loop,
    summarize,
    write_results,
)
from loadgen.cli import build_parser as loadgen_parser
from loadgen.cli import configs_from_args
from loadgen.cli import main as loadgen_main
from loadgen.client import sse_lines, sse_lines_of, sse_payloads
from loadgen.config import parse_priority_spec
from loadgen.plan import load_trace_workload, plan_requests, ttft_targets
from loadgen.replay_args import add_replay_arguments, replay_config
from loadgen.stats import percentile

PREFILL_S_PER_TOKEN = 0.002
ITL_S = 0.02


class StreamingServer:
    """What the fake endpoint saw: (perf_counter arrival, prompt tokens, slo_class field,
    X-SLO-Class header) per request."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, int, str | None, str | None]] = []
        # The body's ``priority`` field per request, in arrival order (None: not sent).
        self.priorities: list[int | None] = []
        self.lock = threading.Lock()
        self.prefill_lock: asyncio.Lock | None = None  # created on the server's event loop

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = await request.json()
            with self.lock:
                self.arrivals.append(
                    (
                        time.perf_counter(),
                        len(body["prompt"]),
                        body.get("slo_class"),
                        request.headers.get("x-slo-class"),
                    )
                )
                self.priorities.append(body.get("priority"))
            if body["model"] == "busy":
                return JSONResponse(
                    {
                        "error": {
                            "message": "overloaded",
                            "type": "rate_limit",
                            "param": None,
                            "code": 429,
                        }
                    },
                    status_code=429,
                )
            n_tokens = body["max_tokens"]
            endless = body["model"] == "endless"
            # vLLM's way: non-ASCII text unescaped (U+2028, NEL, U+2029 are legal raw in a
            # JSON string) and CRLF line ends.
            vllm_like = body["model"] == "separators"
            eol = "\r\n" if vllm_like else "\n"

            async def stream():
                prefill_s = PREFILL_S_PER_TOKEN * len(body["prompt"])
                if body["model"] == "serial":
                    self.prefill_lock = self.prefill_lock or asyncio.Lock()
                    async with self.prefill_lock:
                        await asyncio.sleep(prefill_s)
                else:
                    await asyncio.sleep(prefill_s)
                i = 0
                while endless or i < n_tokens:
                    if i:
                        await asyncio.sleep(ITL_S)
                    text = f" t{i}\u2028\x85\u2029" if vllm_like else f" t{i}"
                    chunk = {
                        "object": "text_completion",
                        "choices": [{"index": 0, "text": text, "finish_reason": None}],
                    }
                    yield f"data: {json.dumps(chunk, ensure_ascii=not vllm_like)}{eol}{eol}"
                    i += 1
                # The usage-only last chunk, with our server's scheduling extension.
                tail = {
                    "choices": [],
                    "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": n_tokens},
                    "flowprefill": {"preemptions": 1, "queue_s": 0.005},
                }
                yield f": a comment line clients must skip{eol}{eol}"
                yield f"data: {json.dumps(tail)}{eol}{eol}"
                yield f"data: [DONE]{eol}{eol}"

            return StreamingResponse(stream(), media_type="text/event-stream")

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            (message,) = body["messages"]
            with self.lock:
                self.arrivals.append(
                    (
                        time.perf_counter(),
                        len(message["content"].split()),
                        body.get("slo_class"),
                        request.headers.get("x-slo-class"),
                    )
                )

            async def stream():
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(ITL_S)
                    chunk = {
                        "choices": [
                            {"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}
                        ]
                    }
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"  # no usage chunk: the client counts token chunks

            return StreamingResponse(stream(), media_type="text/event-stream")

        return app


@pytest.fixture(scope="module")
def server():
    fake = StreamingServer()
    with serving(fake.app(), "the local SSE server") as url:
        fake.url = url
        yield fake


def _plan(*specs: tuple[float, int, int, str, float]) -> list[PlannedRequest]:
    return [
        PlannedRequest(f"r{i}", send_at, prompt, out, cls, slo)
        for i, (send_at, prompt, out, cls, slo) in enumerate(specs)
    ]


def _endpoint(server, model="fake", **kw) -> EndpointConfig:
    return EndpointConfig(base_url=server.url + "/v1", model=model, **kw)


def test_ttft_tpot_e2e_and_slo_verdicts_match_the_servers_known_timing(server):
    # 25 tokens -> first token after 0.05 s (meets 0.5 s with 0.45 s to spare, even on a busy
    # machine); 500 tokens -> 1.0 s (cannot meet it: the server sleeps that long).
    plan = _plan((0.0, 25, 6, "text", 0.5), (0.0, 500, 6, "text", 0.5), (0.05, 25, 1, "file", 6.0))
    result = asyncio.run(run_open_loop(_endpoint(server), ReplayConfig(), plan, progress=False))
    fast, slow, single = result.records
    assert [r.status for r in result.records] == ["ok", "ok", "ok"]
    # Lower bounds are the server's sleeps (causal); upper bounds only say "not the whole
    # stream" and "not another request's time", with room for a loaded machine.
    assert 0.05 <= fast.ttft_s < slow.ttft_s
    assert 1.0 <= slow.ttft_s
    assert fast.ttft_s <= fast.e2e_s and fast.first_token_s == fast.token_times_s[0]
    assert (fast.slo_met, slow.slo_met, single.slo_met) == (True, False, True)
    assert all(r.slo_met == (r.ttft_s <= r.ttft_slo_s) for r in result.records)
    assert fast.output_tokens == 6 and single.output_tokens == 1
    # The server needs 0.05 s + 5 gaps of ITL_S for the whole answer.
    assert fast.e2e_s >= 0.05 + 5 * ITL_S
    assert len(fast.itl_s) == 5 and sum(fast.itl_s) <= 5 * fast.tpot_s  # end >= last token
    assert fast.e2e_s == pytest.approx(fast.ttft_s + 5 * fast.tpot_s)
    assert single.tpot_s is None  # one token has no time per *further* token
    # The server's extension fields reach the record.
    assert fast.preemptions == 1 and fast.server["queue_s"] == 0.005

    summary = summarize(result)
    assert summary["overall"]["attainment"] == pytest.approx(2 / 3)
    assert summary["per_class"]["text"]["attainment"] == pytest.approx(0.5)
    assert summary["per_class"]["file"]["attainment"] == 1.0
    assert summary["overall"]["preemptions"] == 3
    # 3 requests sent over >= 1 s (the floor of the window): 2 req/s, 2 of 3 met the SLO.
    assert summary["request_rate_rps"] == pytest.approx(2.0)
    assert summary["overall"]["goodput_rps"] == pytest.approx(2.0 * 2 / 3)


def test_requests_leave_on_schedule_even_while_earlier_ones_are_still_streaming(server):
    # Each request streams for at least 0.1 + 59 * 0.02 = 1.28 s; they are scheduled 0.1 s
    # apart, so a closed-loop client would send request k at >= 1.28 k s (a lag of >= 1.18 k
    # s); open loop sends it at 0.1 k s. The bounds below sit between the two, far from both.
    server.arrivals.clear()
    plan = _plan(*[(0.1 * i, 50, 60, "text", 10.0) for i in range(5)])
    result = asyncio.run(run_open_loop(_endpoint(server), ReplayConfig(), plan, progress=False))
    records = result.records
    assert all(r.status == "ok" for r in records)
    # Never early, in plan order, and not held back by the streams in flight.
    assert all(r.send_lag_s >= -1e-3 for r in records)
    assert [r.sent_s for r in records] == sorted(r.sent_s for r in records)
    assert max(r.send_lag_s for r in records) < 0.6
    # They overlapped: each was sent before the one before it finished (causally impossible
    # for a client that waits for an answer before sending the next request).
    for earlier, later in zip(records, records[1:], strict=False):
        assert later.sent_s < earlier.end_s
    # The server saw them all, about as far apart as planned.
    arrivals = sorted(a[0] for a in server.arrivals)
    assert len(arrivals) == 5
    offsets = [t - arrivals[0] for t in arrivals]
    for offset, planned in zip(offsets, plan, strict=True):
        assert offset == pytest.approx(planned.send_at_s, abs=0.6)


def test_slo_class_travels_as_body_field_and_header(server):
    server.arrivals.clear()
    plan = _plan((0.0, 10, 1, "search", 4.0))
    asyncio.run(run_open_loop(_endpoint(server), ReplayConfig(), plan, progress=False))
    assert [(a[1], a[2], a[3]) for a in server.arrivals] == [(10, "search", "search")]


def test_each_class_sends_its_priority_and_a_class_without_one_sends_nothing(server):
    server.arrivals.clear()
    server.priorities.clear()
    plan = _plan((0.0, 10, 1, "file", 24.0), (0.01, 10, 1, "text", 1.0))
    priority = parse_priority_spec("auto", ttft_targets(SLOConfig(scale=4)))
    assert priority == {"text": 0, "image": 1, "search": 2, "file": 3}
    endpoint = _endpoint(server, priority=priority, send_slo=False)
    asyncio.run(run_open_loop(endpoint, ReplayConfig(), plan, progress=False))
    assert sorted(zip([a[2] for a in server.arrivals], server.priorities, strict=True)) == [
        (None, 0),
        (None, 3),
    ]
    # A class the mapping lacks: refused before any request leaves.
    server.priorities.clear()
    with pytest.raises(ValueError, match="'search'"):
        asyncio.run(
            run_open_loop(
                _endpoint(server, priority={"text": 0}),
                ReplayConfig(),
                _plan((0.0, 10, 1, "search", 4.0)),
                progress=False,
            )
        )
    assert server.priorities == []
    # Without a mapping no priority field is sent at all.
    asyncio.run(run_open_loop(_endpoint(server), ReplayConfig(), plan[:1], progress=False))
    assert server.priorities == [None]


@pytest.mark.parametrize("spec", ["text", "text=high", "=1", "auto,text=0"])
def test_malformed_priority_specs_are_named(spec):
    with pytest.raises(ValueError, match="CLASS=INTEGER"):
        parse_priority_spec(spec, {"text": 1.0})


def test_cli_priority_reaches_the_endpoint_and_a_bad_one_is_a_clear_error(capsys):
    base = ["run", "--url", "http://127.0.0.1:1", "--model", "m", "--slo-scale", "2"]
    args = loadgen_parser().parse_args([*base, "--priority", "file=0,text=5"])
    endpoint, _, _ = configs_from_args(args)
    assert endpoint.priority == {"file": 0, "text": 5}
    assert configs_from_args(loadgen_parser().parse_args(base))[0].priority is None
    assert loadgen_main([*base, "--priority", "text:0", "--out", "/tmp/unused"]) == 2
    assert "CLASS=INTEGER" in capsys.readouterr().err


def test_max_requests_and_duration_bound_what_is_sent(server):
    plan = _plan(*[(0.05 * i, 10, 1, "text", 1.0) for i in range(10)])
    # duration 0.22 s: only offsets 0, .05, .10, .15, .20 may go; max_requests cuts to 3.
    result = asyncio.run(
        run_open_loop(
            _endpoint(server), ReplayConfig(duration_s=0.22, max_requests=3), plan, progress=False
        )
    )
    assert [r.status for r in result.records] == ["ok"] * 3 + ["not_sent"] * 7
    result = asyncio.run(
        run_open_loop(_endpoint(server), ReplayConfig(duration_s=0.22), plan, progress=False)
    )
    assert sum(r.status == "ok" for r in result.records) == 5
    assert summarize(result)["sent"] == 5


def test_a_stream_that_never_ends_is_cut_drain_seconds_after_the_last_send(server):
    plan = _plan((0.0, 10, 1, "text", 1.0))
    start = time.perf_counter()
    result = asyncio.run(
        run_open_loop(
            _endpoint(server, model="endless"),
            ReplayConfig(duration_s=6.0, drain_s=0.5),
            plan,
            progress=False,
        )
    )
    elapsed = time.perf_counter() - start
    (record,) = result.records
    assert record.status == "unfinished"
    assert record.first_token_s is not None and record.slo_met  # its first token was on time
    assert record.e2e_s is None and record.tpot_s is None  # but it never finished
    # Sent at 0 s, the last (only) send: cut at 0 + 0.5 s, not at duration + drain (6.5 s);
    # the upper bound leaves a busy machine 5.5 s and still tells the two apart.
    assert 0.5 <= elapsed < 6.0


def test_rejected_requests_count_as_slo_misses_with_the_servers_message(server):
    plan = _plan((0.0, 10, 1, "text", 1.0), (0.0, 10, 1, "text", 1.0))
    result = asyncio.run(
        run_open_loop(_endpoint(server, model="busy"), ReplayConfig(), plan, progress=False)
    )
    assert {(r.status, r.http_status, r.error) for r in result.records} == {
        ("http_error", 429, "overloaded")
    }
    summary = summarize(result)
    assert summary["overall"]["attainment"] == 0.0
    assert summary["overall"]["status"] == {"http_error": 2}


def test_unreachable_endpoint_is_recorded_not_raised():
    port = free_port()  # nothing listens there
    plan = _plan((0.0, 10, 1, "text", 1.0))
    endpoint = EndpointConfig(base_url=f"http://127.0.0.1:{port}", model="m")
    result = asyncio.run(run_open_loop(endpoint, ReplayConfig(), plan, progress=False))
    assert result.records[0].status == "error" and "Connect" in result.records[0].error


def test_a_stream_with_unicode_line_separators_in_its_json_is_recorded_whole(server):
    """U+2028, NEL and U+2029 inside a JSON string, CRLF line ends (vLLM streams them so):
    every token is counted and the request is ok, not an error for a cut data line."""
    plan = _plan((0.0, 10, 4, "text", 5.0))
    result = asyncio.run(
        run_open_loop(_endpoint(server, model="separators"), ReplayConfig(), plan, progress=False)
    )
    (record,) = result.records
    assert (record.status, record.error) == ("ok", None)
    assert record.output_tokens == 4 and len(record.token_times_s) == 4
    assert record.server == {"preemptions": 1, "queue_s": 0.005}


def _drain(stage, items: list[str]) -> list:
    """What the async stream stage ``stage`` yields when fed ``items``."""

    async def feed():
        for item in items:
            yield item

    async def collect():
        return [out async for out in stage(feed())]

    return asyncio.run(collect())


def test_sse_lines_split_at_crlf_lf_and_cr_only_across_chunk_boundaries():
    def collect(chunks):
        return _drain(sse_lines, chunks)

    # A CRLF split between chunks is one line end; a lone CR or LF is one too.
    chunks = ["data: a\u2028b\x85c\r", "\n\r\ndata: d\re", "f\n\nda", "ta: g\r"]
    expected = ["data: a\u2028b\x85c", "", "data: d", "ef", "", "data: g"]
    assert collect(chunks) == expected
    assert list(sse_lines_of(chunks)) == expected  # the synchronous twin, same splitter
    assert collect(["data: x"]) == ["data: x"]  # an unterminated last line


def test_sse_parser_skips_comments_stops_at_done_and_rejects_garbage():
    def collect(lines):
        return _drain(sse_payloads, lines)

    got = collect(
        [": hi", "", 'data: {"a": 1}', "event: x", 'data:{"b":2}', "data: [DONE]", 'data: {"c": 3}']
    )
    assert got == [{"a": 1}, {"b": 2}]
    with pytest.raises(ValueError, match="not JSON"):
        collect(["data: {broken"])


def test_plan_from_the_azure_trace_is_deterministic_scaled_and_classed():
    workload = load_trace_workload("azure-code")
    replay = ReplayConfig(
        trace="azure-code", max_requests=50, rate_scale=2.0, prompt_scale=0.1, max_prompt_tokens=300
    )
    targets = ttft_targets(SLOConfig(scale=2.0))
    plan = plan_requests(workload, replay, targets)
    assert plan == plan_requests(workload, replay, targets)
    assert len(plan) == 50
    raw = workload.head(50)
    # Rate scale 2 halves every gap.
    assert plan[-1].send_at_s == pytest.approx((raw[49].arrival_s - raw[0].arrival_s) / 2)
    assert all(1 <= p.prompt_tokens <= 300 for p in plan)
    assert plan[0].prompt_tokens == min(300, -(-raw[0].prompt_tokens // 10))
    assert {p.slo_class for p in plan} <= set(targets) and len({p.slo_class for p in plan}) > 1
    assert all(p.ttft_slo_s == targets[p.slo_class] for p in plan)
    assert targets["text"] == pytest.approx(0.5)


def test_two_tenant_trace_interleaves_both_traces_each_with_its_own_class():
    spec = "azure-conv=urgent,azure-code=relaxed"
    conv, code = load_trace_workload("azure-conv"), load_trace_workload("azure-code")
    merged = load_trace_workload(spec)
    assert len(merged) == len(conv) + len(code)
    assert merged.slo_classes == {"urgent": len(conv), "relaxed": len(code)}
    arrivals = [r.arrival_s for r in merged]
    assert arrivals == sorted(arrivals)
    # Each tenant keeps its own arrival pattern: its requests in order, gaps unchanged.
    code_part = [r for r in merged if r.slo_class == "relaxed"]
    assert [r.prompt_tokens for r in code_part] == [r.prompt_tokens for r in code]
    assert code_part[9].arrival_s - code_part[0].arrival_s == pytest.approx(
        code[9].arrival_s - code[0].arrival_s
    )
    replay = ReplayConfig(trace=spec, max_requests=200, prompt_scale=0.1)
    plan = plan_requests(merged, replay, {"urgent": 6.0, "relaxed": 23.2})
    # The tenants' classes survive the class assignment (which fills only missing ones).
    assert {p.slo_class for p in plan} == {"urgent", "relaxed"}
    assert all(p.ttft_slo_s == (6.0 if p.slo_class == "urgent" else 23.2) for p in plan)


@pytest.mark.parametrize("spec", ["azure-conv=", "=urgent", "azure-conv=urgent,azure-code", " "])
def test_malformed_tenant_trace_specs_are_named(spec):
    with pytest.raises(ValidationError, match="TRACE=CLASS|trace is empty"):
        ReplayConfig(trace=spec)


def test_percentile_interpolates_linearly():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None


def _with_hops(slo_class: str, sent_wall: float, ttft: float, hops: dict | None) -> RequestResult:
    record = RequestResult("r", slo_class, 1.0, 16, 2, scheduled_s=0.0, sent_s=0.0)
    record.sent_wall_s, record.first_token_s, record.status = sent_wall, ttft, "ok"
    record.server = {} if hops is None else {"hops": hops}
    return record


def test_the_ttft_path_splits_the_clients_ttft_at_the_servers_stamps():
    """The three stages add up to the client's TTFT exactly; the segments follow the server's
    path order; a server that returns no hops (vLLM) gets no breakdown."""
    from loadgen.ttft_path import request_hops, ttft_path

    stamps = {
        "http_received": 100.004,
        "engine_submit": 100.006,
        "scheduler_arrival": 100.010,
        "unit_dispatch": 100.110,  # 0.1 s queued
        "worker_start": 100.112,
        "worker_end": 100.212,
        "scheduler_first_token": 100.215,
        "engine_first_token": 100.220,
        "first_chunk": 100.221,
    }
    fast = _with_hops("text", 100.0, 0.230, stamps)
    late = _with_hops("file", 200.0, 1.0, {k: v + 100.0 for k, v in stamps.items()})
    assert request_hops(fast)["client_received"] == pytest.approx(100.230)
    path = ttft_path([fast, late, _with_hops("text", 0.0, 0.2, None)])
    text = path["per_class"]["text"]
    assert text["requests"] == 1  # the record without hops is left out
    stages = {name: d["mean"] for name, d in text["stages_s"].items()}
    assert stages == pytest.approx(
        {"to_scheduler": 0.010, "in_scheduler": 0.205, "from_scheduler": 0.015}
    )
    assert sum(stages.values()) == pytest.approx(text["ttft_s"]["mean"]) == pytest.approx(0.230)
    segments = list(text["segments_s"])
    assert segments[0] == "client_sent->http_received"
    assert segments[-1] == "first_chunk->client_received"
    assert text["segments_s"]["scheduler_arrival->unit_dispatch"]["p50"] == pytest.approx(0.1)
    late_stages = path["per_class"]["file"]["stages_s"]
    assert late_stages["from_scheduler"]["mean"] == pytest.approx(1.0 - 0.215)
    assert path["overall"]["requests"] == 2
    assert ttft_path([_with_hops("text", 0.0, 0.2, None)]) is None


def test_cli_replays_a_csv_trace_and_writes_json_and_csv(server, tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrival_s,input_tokens,output_tokens\n0,40,3\n0.05,400,2\n0.1,30,2\n0.15,20,1\n"
    )
    out = tmp_path / "out"
    rc = loadgen_main(
        [
            "run",
            "--url",
            server.url,
            "--model",
            "fake",
            "--trace",
            str(trace),
            "--rate-scale",
            "2",
            "--requests",
            "3",
            "--duration",
            "30",
            "--slo-scale",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    document = json.loads((out / "results.json").read_text())
    assert document["summary"]["sent"] == 3 and len(document["requests"]) == 3
    assert document["replay"]["rate_scale"] == 2.0
    sends = [r["scheduled_s"] for r in document["requests"]]
    assert sends == pytest.approx([0.0, 0.025, 0.05])
    with (out / "requests.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["prompt_tokens"]) for r in rows] == [40, 400, 30]
    assert all(r["status"] == "ok" and float(r["ttft_s"]) > 0 for r in rows)
    assert "ALL" in capsys.readouterr().out  # the printed report has its total line


def test_cli_rejects_bad_values_with_a_clear_message(capsys):
    rc = loadgen_main(["run", "--url", "ftp://x", "--model", "m", "--out", "/tmp/unused"])
    assert rc == 2
    assert "http://" in capsys.readouterr().err


def test_results_files_carry_every_request(server, tmp_path):
    plan = _plan((0.0, 10, 2, "text", 1.0), (10.0, 10, 2, "text", 1.0))
    result = asyncio.run(
        run_open_loop(
            _endpoint(server), ReplayConfig(duration_s=1.0, drain_s=1.0), plan, progress=False
        )
    )
    paths = write_results(result, tmp_path)
    document = json.loads(paths["json"].read_text())
    assert [r["status"] for r in document["requests"]] == ["ok", "not_sent"]
    assert len(document["requests"][0]["token_times_s"]) == 2
    assert "api_key" not in document["endpoint"]
    from loadgen.output import load_records

    reloaded = load_records(paths["json"])
    assert [(r.status, r.ttft_s, r.output_tokens) for r in reloaded] == [
        (r.status, r.ttft_s, r.output_tokens) for r in result.records
    ]


def test_busiest_window_finds_the_densest_sends():
    from loadgen.result import RequestResult

    def rec(sent):
        return RequestResult("r", "text", 1.0, 1, 1, scheduled_s=sent, sent_s=sent)

    records = [rec(t) for t in (0.0, 5.0, 5.2, 5.4, 5.9, 9.0)]
    from loadgen.plots import busiest_window

    assert busiest_window(records, 1.0) == (5.0, 6.0)


def test_plots_render_from_a_real_replay(server, tmp_path):
    from loadgen.plots import plot_attainment_vs_rate, plot_burst_timeline, plot_ttft_cdf

    plan = _plan(
        (0.0, 150, 3, "text", 0.25),
        (0.02, 20, 3, "text", 0.25),
        (0.04, 30, 2, "search", 4.0),
        (0.06, 10, 2, "file", 6.0),
    )
    result = asyncio.run(run_open_loop(_endpoint(server), ReplayConfig(), plan, progress=False))
    paths = [
        plot_ttft_cdf(result.records, tmp_path / "cdf.png"),
        plot_burst_timeline(result.records, tmp_path / "timeline.png", window_s=1.0),
        plot_attainment_vs_rate(
            {"flowprefill": [(1.0, 1.0), (2.0, 0.95)], "fcfs": [(1.0, 0.9), (2.0, 0.5)]},
            tmp_path / "rate.png",
        ),
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, path


def test_live_goodput_search_finds_where_a_serial_server_starts_missing(server, tmp_path):
    from flowprefill_ray.scheduling.slo import SLOClass
    from flowprefill_ray.simulator.goodput import GoodputSearchConfig
    from loadgen.goodput import live_goodput_search

    # 12 requests 0.1 s apart, each a 0.05 s prefill on a one-at-a-time server, all with a
    # 0.15 s TTFT target. With gaps g < 0.05 s request k waits k * (0.05 - g): the 11th of
    # 12 (90 %) meets 0.15 s while g >= 0.04 s, i.e. up to rate scale 2.5 (less HTTP overhead).
    trace = tmp_path / "trace.csv"
    trace.write_text(
        "arrival_s,input_tokens,output_tokens\n"
        + "".join(f"{0.1 * i:.1f},25,1\n" for i in range(12))
    )
    slo = SLOConfig(
        classes=[
            SLOClass(name=n, ttft_slo_s=0.15, tpot_slo_s=1.0)
            for n in ("text", "image", "search", "file")
        ]
    )
    report = live_goodput_search(
        _endpoint(server, model="serial"),
        ReplayConfig(trace=str(trace)),
        slo,
        tmp_path / "search",
        search=GoodputSearchConfig(start=1.0, rel_tol=0.2, max_scale=16, max_evaluations=8),
        cooldown_s=0.0,
        progress=False,
    )
    assert 1.4 <= report["goodput_rate_scale"] <= 2.6
    assert report["failing_rate_scale"] > report["goodput_rate_scale"]
    assert report["goodput_rps"] == pytest.approx(10 * report["goodput_rate_scale"], rel=0.01)
    attainments = {p["rate_scale"]: p["attainment"] for p in report["points"]}
    assert attainments[1.0] == 1.0 and attainments[report["failing_rate_scale"]] < 0.9
    assert (
        json.loads((tmp_path / "search" / "goodput.json").read_text())["points"] == report["points"]
    )
    assert (tmp_path / "search" / "x1" / "results.json").exists()


def _sim_compare():
    # The live benchmark's simulator comparison: benchmarks/ holds scripts, not a package.
    return load_script("benchmarks/sim_compare.py")


def test_simulator_prediction_of_a_plan_shows_head_of_line_blocking_only_under_fcfs():
    from flowprefill_ray.simulator.experiment import prefill_s
    from flowprefill_ray.simulator.measured import MeasuredCostModel

    sim_compare = _sim_compare()
    plan_workload, simulate_plan = sim_compare.plan_workload, sim_compare.simulate_plan

    # A 4096-token relaxed request and, just after it starts, a 64-token urgent one. The SLO
    # scale is set from the committed profile's own speed, so the test holds whatever machine
    # the profile was measured on: the text target (0.25 s x scale) is half the long prefill,
    # met after one preempted block, missed when waiting for the whole prefill.
    long_s = prefill_s(MeasuredCostModel(), 4096)
    slo = SLOConfig(scale=2 * long_s)
    plan = _plan((0.0, 4096, 1, "file", 6.0 * slo.scale), (0.1, 64, 1, "text", 0.25 * slo.scale))
    assert [(r.arrival_s, r.prompt_tokens, r.slo_class) for r in plan_workload(plan)] == [
        (0.0, 4096, "file"),
        (0.1, 64, "text"),
    ]
    flow = simulate_plan(plan, {"name": "flowprefill"}, slo)
    fcfs = simulate_plan(plan, {"name": "fcfs"}, slo)
    assert flow.attainment == 1.0 and flow.preemptions == 1
    assert fcfs.attainment_by_class() == {"file": 1.0, "text": 0.0}


def test_calibration_separates_live_speed_from_per_unit_and_response_overheads():
    from flowprefill_ray.simulator.experiment import prefill_s
    from flowprefill_ray.simulator.measured import MeasuredCostModel

    sim_compare = _sim_compare()
    calibrate, simulate_plan = sim_compare.calibrate, sim_compare.simulate_plan

    base = MeasuredCostModel()

    def request(tokens, speed=1.2, unit_s=0.010, response_s=0.012, preemptions=0, extra_s=0.0):
        queue = 0.3
        server_ttft = queue + speed * prefill_s(base, tokens) + unit_s + extra_s
        return {
            "prompt_tokens": tokens,
            "ttft_s": server_ttft + response_s,
            "server": {"queue_s": queue, "ttft_s": server_ttft, "preemptions": preemptions},
        }

    requests = [request(t) for t in (16, 64, 200, 512, 900, 1500, 2500, 4000)]
    requests += [
        request(300, extra_s=0.2),  # shared its unit with another request: an outlier
        request(2000, speed=9.0, preemptions=2),  # preempted: left out
    ]
    calibration = calibrate(requests, base)
    assert calibration.requests == 9
    assert calibration.speed == pytest.approx(1.2, rel=1e-3)
    assert calibration.unit_overhead_s == pytest.approx(0.010, abs=1e-4)
    assert calibration.response_overhead_s == pytest.approx(0.012)
    assert "x1.20" in calibration.describe()
    # The simulator pays both: a lone 64-token request's TTFT is compute + unit + response.
    plan = _plan((0.0, 64, 1, "text", 10.0))
    alone = simulate_plan(plan, {"name": "fcfs"}, SLOConfig(), base, calibration=calibration)
    expected = 1.2 * prefill_s(base, 64) + 0.010 + 0.012
    assert alone.outcomes[0].ttft_s == pytest.approx(expected, rel=1e-3)
    # The unit overhead occupies the worker, the response overhead does not: a second request
    # queued behind the first waits for the first one's unit overhead too.
    plan = _plan((0.0, 2000, 1, "file", 10.0), (0.0, 64, 1, "file", 10.0))
    fcfs = {"name": "fcfs"}  # 2000 + 64 tokens exceed max_batch_tokens: two units
    pair = simulate_plan(plan, fcfs, SLOConfig(), base, calibration=calibration)
    second = 1.2 * (prefill_s(base, 2000) + prefill_s(base, 64)) + 2 * 0.010 + 0.012
    assert pair.outcomes[1].ttft_s == pytest.approx(second, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2 unpreempted"):
        calibrate([request(100, preemptions=1)], base)


def test_chat_api_sends_text_of_the_planned_length_and_counts_chunks_without_usage(server):
    server.arrivals.clear()
    plan = _plan((0.0, 37, 4, "image", 2.0))
    result = asyncio.run(
        run_open_loop(_endpoint(server, api="chat"), ReplayConfig(), plan, progress=False)
    )
    (record,) = result.records
    assert record.status == "ok" and record.output_tokens == 4 and record.slo_met
    # One word per intended token, and the class travelled with it.
    assert [(a[1], a[2], a[3]) for a in server.arrivals] == [(37, "image", "image")]


# --- the shared replay flags (loadgen/replay_args.py) ---

# A value different from ReplayConfig's default for every field a flag sets.
_EVERY_REPLAY_FLAG = {
    "--trace": ("azure-code", "trace", "azure-code"),
    "--start": ("12.5", "start_s", 12.5),
    "--rate-scale": ("3", "rate_scale", 3.0),
    "--prompt-scale": ("0.25", "prompt_scale", 0.25),
    "--max-prompt-tokens": ("700", "max_prompt_tokens", 700),
    "--max-output-tokens": ("9", "max_output_tokens", 9),
    "--requests": ("17", "max_requests", 17),
    "--duration": ("45", "duration_s", 45.0),
    "--drain": ("5", "drain_s", 5.0),
    "--seed": ("3", "seed", 3),
}


def _live_policies():
    return load_script("benchmarks/live_policies.py")


def _live_policies_parse_args():
    return _live_policies().parse_args


def test_live_comparison_prices_the_model_it_served():
    from flowprefill_ray.simulator.measured import profile_path

    choose = _live_policies().simulator_cost_model
    # The default model (SmolLM2, 30 layers) and the tiny model (its cache path, 4 layers)
    # each get their own committed profile; --profile overrides both.
    assert choose("default", None).num_layers == 30
    assert choose("/cache/tiny-llama-environment", None).num_layers == 4
    assert choose("default", str(profile_path("tiny"))).num_layers == 4


def test_every_replay_flag_reaches_its_replay_config_field():
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    argv = [a for flag, (value, _, _) in _EVERY_REPLAY_FLAG.items() for a in (flag, value)]
    replay = replay_config(parser.parse_args([*argv, "--token-id-range", "4", "40"]))
    expected = {field: value for _, field, value in _EVERY_REPLAY_FLAG.values()}
    expected.update(token_id_low=4, token_id_high=40)
    assert replay == ReplayConfig(**expected)
    # Guard against a vacuous round trip: no expected value is ReplayConfig's default.
    assert all(getattr(ReplayConfig(), f) != v for f, v in expected.items())


def test_each_command_keeps_its_own_replay_defaults():
    endpoint = ["--url", "http://127.0.0.1:1", "--model", "m"]
    generic = ReplayConfig()
    for command in ("run", "goodput"):
        assert replay_config(loadgen_parser().parse_args([command, *endpoint])) == generic
    cpu_slice = dict(
        max_requests=48,
        prompt_scale=0.1,
        max_prompt_tokens=384,
        max_output_tokens=8,
        duration_s=120.0,
        drain_s=30.0,
    )
    demo = demo_parser().parse_args([])
    assert replay_config(demo) == ReplayConfig(**cpu_slice, rate_scale=0.6)
    assert demo.slo_scale == 4.0
    live = _live_policies_parse_args()([])
    assert replay_config(live) == ReplayConfig(**{**cpu_slice, "max_requests": 40})


def test_commands_whose_search_sets_the_rate_scale_offer_no_rate_scale_flag(capsys):
    with pytest.raises(SystemExit):
        loadgen_parser().parse_args(
            ["goodput", "--url", "http://x", "--model", "m", "--rate-scale", "2"]
        )
    with pytest.raises(SystemExit):
        _live_policies_parse_args()(["--rate-scale", "2"])
    assert "unrecognized arguments: --rate-scale" in capsys.readouterr().err


def test_max_requests_still_works_with_a_deprecation_warning(capsys):
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser, max_requests=48)
    assert replay_config(parser.parse_args(["--max-requests", "7"])).max_requests == 7
    assert "--max-requests is deprecated, use --requests" in capsys.readouterr().err
    assert "--max-requests" not in parser.format_help()  # not advertised any more


def test_replay_flag_mistakes_are_named():
    with pytest.raises(TypeError, match="max_request"):
        add_replay_arguments(argparse.ArgumentParser(), max_request=5)
    parser = argparse.ArgumentParser()
    add_replay_arguments(parser)
    with pytest.raises(ValidationError, match="rate_scale"):
        replay_config(parser.parse_args(["--rate-scale", "0"]))
    with pytest.raises(ValidationError, match="token id range"):
        replay_config(parser.parse_args(["--token-id-range", "9", "9"]))


def test_simulated_goodput_of_a_live_slice_holds_the_target_and_overheads_lower_it():
    sim_compare = _sim_compare()
    RuntimeCalibration = sim_compare.RuntimeCalibration
    simulate_plan, simulated_goodput = sim_compare.simulate_plan, sim_compare.simulated_goodput

    replay = ReplayConfig(
        trace="azure-conv", max_requests=40, prompt_scale=1.0, max_prompt_tokens=4096,
        max_output_tokens=8, duration_s=600.0,
    )  # fmt: skip
    slo = SLOConfig(scale=3.0)
    fcfs = {"name": "fcfs"}
    scale = simulated_goodput(replay, slo, fcfs)
    trial = replay.model_copy(update={"rate_scale": scale})
    plan = plan_requests(load_trace_workload(replay.trace), trial, ttft_targets(slo))
    assert simulate_plan(plan, fcfs, slo).attainment >= 0.9
    # Per-unit and per-response costs can only lower what the simulator says a policy holds.
    slow = RuntimeCalibration(speed=1.5, unit_overhead_s=0.03, response_overhead_s=0.02, requests=1)
    assert simulated_goodput(replay, slo, fcfs, slow) < scale
    assert simulated_goodput(replay, slo, {"name": "flowprefill"}) > scale


def test_the_load_generator_talks_http_only():
    """loadgen drives any OpenAI-compatible endpoint: it imports nothing of our runtime or
    Serve app (deploying our app locally lives in flowprefill_ray.demos.local_serve)."""
    import ast

    offenders = []
    for path in sorted((Path(__file__).resolve().parent.parent / "loadgen").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            )  # fmt: skip
            for name in names:
                if name.startswith(("flowprefill_ray.runtime", "flowprefill_ray.serve", "ray")):
                    offenders.append(f"{path.name}: {name}")
    assert offenders == []
