"""Tokenizer loading: the Hugging Face tokenizer stored beside a checkpoint."""

from __future__ import annotations

from pathlib import Path

from .errors import ModelConfigError


def load_tokenizer(path: str | Path):
    """The transformers tokenizer of checkpoint directory `path` (offline, local files only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelConfigError(f"no tokenizer.json or tokenizer_config.json in {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
