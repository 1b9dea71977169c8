"""Regenerate the result tables of README.md and docs/*.md from docs/results/*.json.

    .venv/bin/python scripts/benchmark_tables.py          # rewrite every marked table
    .venv/bin/python scripts/benchmark_tables.py --check  # exit 1 naming each table that differs

A generated table sits between two markers that name it and its source JSON:

    <!-- generated: prefix_ttft from docs/results/prefix_ttft.json -->
    | case | cold TTFT | ...
    <!-- end generated: prefix_ttft -->

Only the text between the markers is rewritten; the names and their renderers are in
``result_tables.py`` (simulator), ``two_tenant_tables.py`` (two-tenant simulator),
``live_result_tables.py`` (live runs) and
``readme_headline.py``. A table edited by hand without its JSON, a JSON changed without its
table, a marker naming an unknown table or other sources than the table is built from: each
fails ``--check`` (issue 14, section 1: every figure comes from a committed JSON file).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import live_result_tables  # noqa: F401  (registers its tables)
import readme_headline  # noqa: F401  (registers the headline)
import steady_result_tables  # noqa: F401  (registers its tables)
import two_tenant_tables  # noqa: F401  (registers its tables)
from result_tables import TABLES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/*.md")

BEGIN = re.compile(r"<!-- generated: (?P<name>[\w-]+) from (?P<sources>[^>]+?) -->\n")


class MarkerError(ValueError):
    """A marker the script cannot honour (unknown table, wrong sources, no end marker)."""


@dataclass(frozen=True)
class Block:
    doc: str
    name: str
    sources: tuple[str, ...]
    start: int  # offset of the first character after the begin marker
    end: int  # offset of the end marker


def end_marker(name: str) -> str:
    return f"<!-- end generated: {name} -->"


def find_blocks(doc: str, text: str) -> list[Block]:
    blocks = []
    for match in BEGIN.finditer(text):
        name = match["name"]
        sources = tuple(match["sources"].replace(",", " ").split())
        spec = TABLES.get(name)
        if spec is None:
            raise MarkerError(f"{doc}: unknown generated table {name!r} (known: {sorted(TABLES)})")
        if sources != spec.sources:
            raise MarkerError(
                f"{doc}: table {name} names {' '.join(sources)}, but it is built from "
                f"{' '.join(spec.sources)}"
            )
        end = text.find(end_marker(name), match.end())
        if end < 0:
            raise MarkerError(f"{doc}: table {name} has no {end_marker(name)!r}")
        blocks.append(Block(doc, name, sources, match.end(), end))
    return blocks


def render(name: str, root: Path, cache: dict[str, object]) -> str:
    spec = TABLES[name]
    data = []
    for source in spec.sources:
        if source not in cache:
            cache[source] = json.loads((root / source).read_text())
        data.append(cache[source])
    return spec.render(*data).rstrip("\n") + "\n"


def regenerate(
    doc: str, text: str, root: Path, cache: dict[str, object]
) -> tuple[str, list[Block]]:
    """``text`` with every marked table rendered afresh, and the blocks whose text changed."""
    changed = []
    out, last = [], 0
    for block in find_blocks(doc, text):
        fresh = render(block.name, root, cache)
        if text[block.start : block.end] != fresh:
            changed.append(block)
        out += [text[last : block.start], fresh]
        last = block.end
    out.append(text[last:])
    return "".join(out), changed


def doc_paths(root: Path) -> list[Path]:
    paths: list[Path] = []
    for pattern in DOCS:
        paths += sorted(root.glob(pattern))
    return paths


def run(root: Path, check: bool) -> tuple[list[Block], int]:
    """(blocks that differ from their JSON, blocks seen); rewrites the docs unless ``check``."""
    cache: dict[str, object] = {}
    differing, seen = [], 0
    for path in doc_paths(root):
        doc = str(path.relative_to(root))
        text = path.read_text()
        fresh, changed = regenerate(doc, text, root, cache)
        seen += len(find_blocks(doc, text))
        differing += changed
        if changed and not check:
            path.write_text(fresh)
    return differing, seen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 on a difference")
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this one)")
    args = p.parse_args(argv)
    try:
        differing, seen = run(args.root, args.check)
    except MarkerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for block in differing:
        verb = "differs from" if args.check else "rewritten from"
        print(f"{block.doc}: table {block.name} {verb} {' '.join(block.sources)}")
    if args.check and differing:
        print(
            f"{len(differing)} of {seen} generated tables differ from their JSON; run "
            "scripts/benchmark_tables.py to rewrite them (or fix the JSON)",
            file=sys.stderr,
        )
        return 1
    print(f"{seen} generated tables, {len(differing)} {'differ' if args.check else 'rewritten'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
