"""Trace loaders, synthetic arrivals, SLO-class assignment and rate scaling."""

from __future__ import annotations

import json
import statistics

import pytest

from flowprefill_ray.workloads import (
    BailianConfig,
    FixedLength,
    SLOAssignmentConfig,
    SyntheticConfig,
    TraceFormatError,
    TraceLength,
    TraceRecord,
    UniformLength,
    Workload,
    assign_slo_classes,
    load_azure_raw,
    load_bailian,
    load_builtin,
    load_burstgpt,
    load_mooncake,
    load_normalized_csv,
    parse_azure_timestamp,
    synthetic_workload,
)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- loaders


def test_azure_raw_reads_seven_digit_timestamps_and_rebases_to_zero(tmp_path):
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:46.1000000,10,1\n",  # out of order: loader sorts
    )
    w = load_azure_raw(path)
    assert [r.prompt_tokens for r in w] == [10, 374, 396]
    assert w[0].arrival_s == 0.0
    assert w[1].arrival_s == pytest.approx(0.58059, abs=1e-6)
    assert w[2].arrival_s == pytest.approx(4.895169, abs=1e-6)
    assert parse_azure_timestamp("1970-01-01 00:00:01.5000000") == pytest.approx(1.5)


def test_azure_raw_bad_timestamp_names_file_and_line(tmp_path):
    path = write(
        tmp_path,
        "azure.csv",
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\nyesterday,1,1\n",
    )
    with pytest.raises(TraceFormatError, match=r"azure\.csv:3: bad TIMESTAMP 'yesterday'"):
        load_azure_raw(path)


def test_normalized_csv_errors_name_the_line_and_field(tmp_path):
    good = write(tmp_path, "n.csv", "arrival_s,input_tokens,output_tokens\n0,5,1\n0.5,7,2\n")
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in load_normalized_csv(good)] == [
        (0.0, 5, 1),
        (0.5, 7, 2),
    ]
    neg = write(tmp_path, "neg.csv", "arrival_s,input_tokens,output_tokens\n0,5,1\n1,-3,1\n")
    with pytest.raises(
        TraceFormatError, match=r"neg\.csv:3: field 'input_tokens' must be a non-negative integer"
    ):
        load_normalized_csv(neg)
    missing = write(tmp_path, "miss.csv", "arrival_s,input_tokens\n0,5\n")
    with pytest.raises(
        TraceFormatError, match=r"miss\.csv:1: header lacks columns \['output_tokens'\]"
    ):
        load_normalized_csv(missing)
    text = write(tmp_path, "t.csv", "arrival_s,input_tokens,output_tokens\nsoon,5,1\n")
    with pytest.raises(TraceFormatError, match=r"t\.csv:2: field 'arrival_s' is not a number"):
        load_normalized_csv(text)


def test_burstgpt_skips_failed_requests_and_counts_them(tmp_path):
    path = write(
        tmp_path,
        "burst.csv",
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,100,20,120,Conversation log\n"
        "6,ChatGPT,300,0,300,Conversation log\n"  # failed: no response
        "8,GPT-4,50,10,60,API log\n",
    )
    w = load_burstgpt(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in w] == [
        (0.0, 100, 20),
        (3.0, 50, 10),
    ]
    assert w.skipped_rows == 1

    with_status = write(
        tmp_path,
        "burst_status.csv",
        "Timestamp,Request tokens,Response tokens,Status\n1,10,5,success\n2,20,5,failed\n",
    )
    w = load_burstgpt(with_status)
    assert len(w) == 1 and w.skipped_rows == 1


def test_mooncake_reads_milliseconds_and_hash_ids(tmp_path):
    rows = [
        {"timestamp": 0, "input_length": 6955, "output_length": 52, "hash_ids": [0, 1, 2]},
        {"timestamp": 2500, "input_length": 100, "output_length": 5, "hash_ids": [0, 7]},
    ]
    path = write(tmp_path, "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    w = load_mooncake(path)
    assert [r.arrival_s for r in w] == [0.0, 2.5]
    assert w[1].hash_ids == (0, 7)
    bad = write(tmp_path, "bad.jsonl", json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(TraceFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        load_mooncake(bad)


def test_bailian_maps_request_types_to_slo_classes(tmp_path):
    rows = [
        {"timestamp": 10.0, "input_length": 200, "output_length": 20, "type": "text"},
        {"timestamp": 10.5, "input_length": 9000, "output_length": 50, "type": "file"},
        {"timestamp": 11.0, "input_length": 800, "output_length": 30, "type": "video"},
    ]
    path = write(tmp_path, "b.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(
        TraceFormatError, match=r"b\.jsonl:3: request type 'video' has no SLO class"
    ):
        load_bailian(path)
    w = load_bailian(path, BailianConfig(unknown_type="unassigned"))
    assert [r.slo_class for r in w] == ["text", "file", None]
    assert [r.arrival_s for r in w] == [0.0, 0.5, 1.0]
    remapped = load_bailian(
        path, BailianConfig(type_to_slo_class={"text": "image", "file": "search", "video": "file"})
    )
    assert [r.slo_class for r in remapped] == ["image", "search", "file"]


def test_builtin_azure_traces_span_an_hour():
    conv = load_builtin("azure_2023_conv")
    code = load_builtin("azure_2023_code")
    assert len(conv) == 19366 and len(code) == 8819
    assert 3400 < conv.duration_s < 3600 and 3400 < code.duration_s < 3600
    with pytest.raises(ValueError, match="unknown built-in trace 'azure_2024'"):
        load_builtin("azure_2024")


# ----------------------------------------------------------------------------- transformations


def small_workload() -> Workload:
    return Workload(
        "w", tuple(TraceRecord(t, 100 * (i + 1), 10) for i, t in enumerate([1.0, 2.0, 4.0, 8.0]))
    )


def test_rate_scale_two_halves_every_gap():
    w = small_workload().scale_rate(2.0)
    assert [r.arrival_s for r in w] == [1.0, 1.5, 2.5, 4.5]
    assert [r.prompt_tokens for r in w] == [100, 200, 300, 400]
    assert w.mean_rate_per_s == pytest.approx(2 * small_workload().mean_rate_per_s)
    with pytest.raises(ValueError, match="rate scale must be > 0"):
        small_workload().scale_rate(0)


def test_window_and_head_slice_the_trace():
    w = small_workload()
    win = w.window(2.0, 8.0)
    assert [r.arrival_s for r in win] == [0.0, 2.0]
    assert [r.arrival_s for r in w.window(2.0, 8.0, rebase=False)] == [2.0, 4.0]
    assert [r.prompt_tokens for r in w.head(2)] == [100, 200]


# ----------------------------------------------------------------------------- synthetic


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_synthetic_arrivals_have_the_requested_rate_and_burstiness(arrival, cv):
    cfg = SyntheticConfig(
        rate_per_s=10.0,
        arrival=arrival,
        cv=cv,
        num_requests=4000,
        seed=3,
        prompt=FixedLength(tokens=64),
        output=FixedLength(tokens=8),
    )
    w = synthetic_workload(cfg)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(w.records, w.records[1:], strict=False)]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.1, rel=0.1)
    assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.15)
    assert synthetic_workload(cfg) == w  # seeded: reproducible


def test_synthetic_lengths_follow_their_distributions():
    w = synthetic_workload(
        SyntheticConfig(
            rate_per_s=1,
            duration_s=200,
            prompt=UniformLength(low=10, high=20),
            output=FixedLength(tokens=3),
        )
    )
    assert all(10 <= r.prompt_tokens <= 20 for r in w) and {r.output_tokens for r in w} == {3}
    assert max(r.arrival_s for r in w) < 200
    resampled = synthetic_workload(
        SyntheticConfig(rate_per_s=1, num_requests=300, prompt=TraceLength())
    )
    trace_pairs = {(r.prompt_tokens, r.output_tokens) for r in load_builtin("azure_2023_conv")}
    assert all((r.prompt_tokens, r.output_tokens) in trace_pairs for r in resampled)
    with pytest.raises(ValueError, match="exactly one of num_requests or duration_s"):
        SyntheticConfig(rate_per_s=1)


# ----------------------------------------------------------------------------- SLO classes


def test_full_affinity_gives_length_bands_tightest_class_to_shortest():
    w = Workload(
        "w", tuple(TraceRecord(float(i), tokens, 1) for i, tokens in enumerate(range(100, 0, -1)))
    )
    cfg = SLOAssignmentConfig(mix={"text": 0.5, "file": 0.5}, length_affinity=1.0)
    out = assign_slo_classes(w, cfg)
    by_len = {r.prompt_tokens: r.slo_class for r in out}
    assert all(by_len[t] == "text" for t in range(1, 51))
    assert all(by_len[t] == "file" for t in range(51, 101))


def test_assignment_matches_the_mix_and_keeps_existing_classes():
    w = assign_slo_classes(load_builtin("azure_2023_conv").head(4000), SLOAssignmentConfig(seed=7))
    counts = w.slo_classes
    assert counts["text"] / 4000 == pytest.approx(0.4, abs=0.03)
    for cls in ("image", "search", "file"):
        assert counts[cls] / 4000 == pytest.approx(0.2, abs=0.03)
    mean_len = {c: statistics.fmean(r.prompt_tokens for r in w if r.slo_class == c) for c in counts}
    assert mean_len["text"] < mean_len["image"] < mean_len["file"]

    fixed = Workload("w", (TraceRecord(0.0, 10, 1, "file"), TraceRecord(1.0, 10, 1, None)))
    out = assign_slo_classes(fixed, SLOAssignmentConfig(mix={"text": 1.0}))
    assert [r.slo_class for r in out] == ["file", "text"]


def test_to_requests_stamps_class_targets_from_the_slo_config():
    from flowprefill_ray.scheduling import SLOConfig

    w = Workload("t", (TraceRecord(0.0, 100, 0, "text"), TraceRecord(1.5, 900, 7, None)))
    reqs = w.to_requests(SLOConfig(scale=2.0))
    assert [r.request_id for r in reqs] == ["t-0", "t-1"]
    assert [r.slo_class for r in reqs] == ["text", "text"]  # unassigned -> default class
    assert [r.ttft_slo_s for r in reqs] == [0.5, 0.5]
    assert reqs[1].deadline_s == pytest.approx(2.0)
    assert reqs[0].max_output_tokens == 1  # a 0-token answer still needs its first token
    assert w.to_requests()[0].ttft_slo_s is None
