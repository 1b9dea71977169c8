"""No credentials in the repository: every file git would ship is scanned for key and token
shapes. (The k8s manifests' own checks - token from a Secret, nothing exposed - live in
tests/test_k8s.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Written in pieces so that this file does not match itself.
_BEGIN = "-----" + "BEGIN"
SECRET_SHAPES = {
    "private key block": re.compile(_BEGIN + r" (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Hugging Face token": re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),
    "OpenAI-style secret key": re.compile(r"\bsk-(?:proj-)?[A-Za-z0-9_-]{32,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "JWT": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    # key = "long literal": a real value pasted into code or config
    "assigned secret literal": re.compile(
        r"(?i)\b(?:api[_-]?key|secret|password|passwd|auth[_-]?token)\b\s*[:=]\s*"
        r"[\"']([A-Za-z0-9+/_\-]{24,})[\"']"
    ),
}
# Files larger than this are data (traces, profiles), not where a key gets pasted.
_MAX_BYTES = 2 << 20


def shipped_files() -> list[Path]:
    """Tracked files plus untracked ones git does not ignore (what a commit could pick up)."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return [REPO / name for name in out.decode().split("\0") if name]


def secrets_in(text: str) -> list[str]:
    return [kind for kind, shape in SECRET_SHAPES.items() if shape.search(text)]


def test_the_scanner_finds_each_kind_of_planted_secret():
    planted = {
        "private key block": _BEGIN + " OPENSSH PRIVATE KEY-----\nb3BlbnNzaA==",
        "AWS access key id": "aws_id AKIA" + "ABCDEFGHIJKLMNOP",
        "GitHub token": "ghp_" + "a1" * 18,
        "Hugging Face token": "hf_" + "Q" * 34,
        "OpenAI-style secret key": "sk-" + "x9" * 20,
        "Slack token": "xoxb-" + "1234567890-abc",
        "JWT": "eyJ" + "a" * 12 + ".eyJ" + "b" * 12 + "." + "c" * 12,
        "assigned secret literal": 'api_key = "' + "Zq3" * 10 + '"',
    }
    for kind, text in planted.items():
        assert kind in secrets_in(text), kind
    # Names of variables and placeholders are not secrets.
    assert secrets_in('api_key_env: FLOWPREFILL_API_KEY\npassword = os.environ["PW"]') == []


def test_no_file_in_the_repository_holds_a_secret():
    files = shipped_files()
    assert len(files) > 50  # the listing worked
    found = []
    for path in files:
        if not path.is_file() or path.stat().st_size > _MAX_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        found += [(str(path.relative_to(REPO)), kind) for kind in secrets_in(text)]
    if found:
        pytest.fail(f"possible secrets committed: {found}")
