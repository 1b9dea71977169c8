"""Every generated table in README.md and docs/*.md equals what its committed JSON gives
(issue 14, section 1), and the README's headline numbers are the JSON's (section 6)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from repo_scripts import ROOT, load_script

# The scripts import their siblings by name: load those first.
load_script("scripts/result_tables.py")
load_script("scripts/live_result_tables.py")
load_script("scripts/two_tenant_tables.py")
load_script("scripts/steady_result_tables.py")
load_script("scripts/readme_headline.py")
tables = load_script("scripts/benchmark_tables.py")

HEADLINE = re.compile(
    r"<!-- generated: readme_headline from [^>]+ -->\n(?P<body>.*?)<!-- end generated", re.S
)


def results(name: str) -> dict:
    return json.loads((ROOT / "docs/results" / name).read_text())


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The docs and their JSON, copied: a test may edit them."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("*.png"))
    return tmp_path


def test_every_generated_table_in_the_docs_equals_its_json(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr()
    docs = "".join(p.read_text() for p in tables.doc_paths(ROOT))
    marked = {m["name"] for m in tables.BEGIN.finditer(docs)}
    # Every registered table is used somewhere, so none is generated for nothing.
    assert marked == set(tables.TABLES)


def test_check_names_the_table_whose_cell_was_edited_by_hand(repo_copy, capsys):
    doc = repo_copy / "docs/BENCHMARKS.md"
    original = doc.read_text()
    # The table's first data row (after the marker, the header and the rule), one cell changed.
    begin = original.index("<!-- generated: prefix_ttft ")
    row_start = begin
    for _ in range(3):
        row_start = original.index("\n", row_start) + 1
    row_end = original.index("\n", row_start)
    cells = original[row_start:row_end].split(" | ")
    cells[1] = "1 ms" if cells[1] != "1 ms" else "2 ms"  # the cold TTFT, typed in by hand
    doc.write_text(original[:row_start] + " | ".join(cells) + original[row_end:])

    assert tables.main(["--check", "--root", str(repo_copy)]) == 1
    out = capsys.readouterr().out
    assert "docs/BENCHMARKS.md: table prefix_ttft differs" in out
    assert out.count("differs") == 1  # only the edited table

    # Without --check the script puts the JSON's number back, and only inside the markers.
    assert tables.main(["--root", str(repo_copy)]) == 0
    assert doc.read_text() == original


def test_check_fails_when_the_json_changes_under_a_table(repo_copy, capsys):
    path = repo_copy / "docs/results/baselines_sim.json"
    report = json.loads(path.read_text())
    report["summaries"][0]["flowprefill_over_best"] = 2.5
    path.write_text(json.dumps(report))

    assert tables.main(["--check", "--root", str(repo_copy)]) == 1
    out = capsys.readouterr().out
    for doc, name in [
        ("README.md", "readme_headline"),
        ("docs/BENCHMARKS.md", "baselines_sim_summary"),
        ("docs/SIMULATOR.md", "baselines_sim"),
    ]:
        assert f"{doc}: table {name} differs" in out


def test_a_marker_naming_other_sources_than_the_table_is_refused(repo_copy, capsys):
    doc = repo_copy / "docs/RUNTIME.md"
    text = doc.read_text()
    wrong = text.replace(
        "<!-- generated: preemption_latency from docs/results/preemption_latency.json -->",
        "<!-- generated: preemption_latency from docs/results/prefix_ttft.json -->",
    )
    assert wrong != text
    doc.write_text(wrong)
    assert tables.main(["--check", "--root", str(repo_copy)]) == 2
    assert "table preemption_latency names docs/results/prefix_ttft.json" in capsys.readouterr().err


def test_a_marker_without_its_end_is_refused(repo_copy, capsys):
    doc = repo_copy / "docs/RUNTIME.md"
    doc.write_text(doc.read_text().replace("<!-- end generated: preemption_latency -->", ""))
    assert tables.main(["--root", str(repo_copy)]) == 2
    assert "preemption_latency has no" in capsys.readouterr().err


# ----------------------------------------------------------------------- the README headline


def headline() -> str:
    match = HEADLINE.search((ROOT / "README.md").read_text())
    assert match, "README.md has no generated readme_headline block"
    return match["body"]


def test_readme_headline_ratios_are_the_simulators_ratios_over_the_best_baseline():
    text = headline()
    found = {
        (trace, int(workers)): (float(ratio), [float(w) for w in re.findall(r"([\d.]+)x", windows)])
        for ratio, trace, workers, windows in re.findall(
            r"\*\*(\d+\.\d+)x\*\* on (\w+) with (\d+) workers? \(windows: ([\d.x, ]+x);", text
        )
    }
    report = results("baselines_sim.json")
    expected = {
        (s["trace"].rsplit("_", 1)[-1], s["workers"]): (
            round(s["flowprefill_over_best"], 2),
            [round(w["ratio"], 2) for w in s["per_window_over_own_best"]],
        )
        for s in report["summaries"]
    }
    assert found == expected


def test_readme_headline_live_figures_are_the_jsons():
    text = headline()
    runs = results("why_late.json")["runs"]
    line = next(row for row in text.splitlines() if "Two tenants on the live" in row)
    # Per rate: the shipped run, then overtaking off: all, urgent, relaxed, in that order.
    shown = [float(v) for v in re.findall(r"([\d.]+) %", line.split("TTFT SLO", 1)[1])]
    expected = [
        round(value * 100, 1)
        for key in ("shipped_x038_ba4a9be", "no_overtake_x038_ba4a9be")
        + ("shipped_ba4a9be", "no_overtake_ba4a9be")
        for value in (
            runs[key]["attainment"],
            runs[key]["per_class"]["urgent"]["attainment"],
            runs[key]["per_class"]["relaxed"]["attainment"],
        )
    ]
    assert shown == expected

    prefix = results("prefix_ttft.json")
    percents = [int(p) for p in re.findall(r"\(\*\*(\d+) %\*\*\)", text)]
    assert percents == [
        round(prefix["ratios"]["repeat"] * 100),
        round(prefix["ratios"]["extension"] * 100),
    ]
    assert f"{prefix['median_ttft_s']['cold'] * 1000:,.0f} ms" in text

    hop = results("preemption_latency.json")["modes"]["one_hop"]["end_to_end_ms"]
    p50, p99 = re.search(r"p50 \*\*([\d.]+) ms\*\*, p99 \*\*([\d.]+) ms\*\*", text).groups()
    assert (float(p50), float(p99)) == (round(hop["p50"], 1), round(hop["p99"], 1))


def test_readme_headline_live_goodput_is_read_off_the_steady_trials():
    from loadgen.steady_goodput import grid_goodput

    line = next(row for row in headline().splitlines() if "Live, steady state" in row)
    runs = [results(f"live_goodput_steady{part}.json") for part in ("", "_high", "_srpf512")]
    target = runs[0]["rules"]["target"]

    def reading(name: str) -> dict:
        trials = [t for r in runs for t in r["systems"].get(name, {}).get("trials", [])]
        return grid_goodput(trials, target)

    ours = reading("flowprefill")
    others = {n: reading(n) for r in runs for n in r["systems"] if n != "flowprefill"}
    best = max(others.values(), key=lambda g: g["goodput_mean_curve_rps"])
    curve = [float(v) for v in re.findall(r"\*\*([\d.]+) req/s", line)]
    assert curve == [round(ours["goodput_mean_curve_rps"], 2)]
    ratio = ours["goodput_mean_curve_rps"] / best["goodput_mean_curve_rps"]
    assert f"**{ratio:.2f}x**" in line
    assert f"{best['goodput_mean_curve_rps']:.2f} req/s" in line
    strict = f"{ours['goodput_rps']:.3f} against {best['goodput_rps']:.3f} req/s"
    assert strict in line
    bound = results("live_goodput_steady_capacity.json")["capacity_bound_rps_median"]
    assert f"capacity bound ({bound:.2f} req/s" in line


def test_readme_headline_vllm_goodput_is_read_off_the_side_by_side_trials():
    from loadgen.steady_goodput import grid_goodput

    line = next(row for row in headline().splitlines() if "against vLLM on CPU" in row)
    runs = [results(f"live_goodput_steady_vllm{part}.json") for part in ("", "_high")]
    target = runs[0]["rules"]["target"]

    def reading(name: str) -> dict:
        trials = [t for r in runs for t in r["systems"].get(name, {}).get("trials", [])]
        return grid_goodput(trials, target)

    ours = reading("flowprefill")
    assert f"**{ours['goodput_mean_curve_rps']:.2f} req/s" in line
    for name in ("vllm-priority-mnbt512", "vllm-fcfs-mnbt512"):
        vllm = reading(name)
        policy = name.split("-")[1]
        assert re.search(
            rf"vLLM {policy} \(512-token budget[^)]*\) {vllm['goodput_mean_curve_rps']:.2f}", line
        )
        if vllm["goodput_mean_curve_rps"]:
            ratio = ours["goodput_mean_curve_rps"] / vllm["goodput_mean_curve_rps"]
            assert f"**{ratio:.2f}x**" in line
        assert f"{ours['goodput_rps']:.3f} against {vllm['goodput_rps']:.3f} req/s" in line


def test_readme_headline_links_each_figure_to_committed_json_and_has_no_burst_figures():
    text = headline()
    links = re.findall(r"\]\((docs/results/[\w.]+)\)", text)
    assert len(links) == 10 and all((ROOT / link).is_file() for link in links)
    # The burst-drain goodputs have no raw data (issue 14): not in the headline.
    for burst in ("15.4", "8.0x", "6.70", "1.93"):
        assert burst not in text
