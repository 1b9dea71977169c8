#!/usr/bin/env bash
# Drive a local FlowPrefill deployment with NVIDIA's aiperf load generator.
#
# aiperf is heavy and not a project dependency, so it lives in its own venv (AIPERF_VENV).
# The script starts a local Ray cluster with the Serve app (deployments/local.yaml, on a free
# loopback port), waits for /health, runs `aiperf profile` (streaming completions), prints
# aiperf's summary, and stops everything. Artifacts go to results/aiperf/ (git-ignored).
#
#   bash scripts/aiperf_check.sh                 # 20 requests, concurrency 2, ISL 128, OSL 16
#   REQUESTS=50 CONCURRENCY=4 bash scripts/aiperf_check.sh
#
# Against a server that is already running (another system, e.g. vLLM: no Ray is started), at
# a request rate instead of a concurrency, with extra body fields (benchmarks/peer_vllm.py):
#   TARGET_URL=http://127.0.0.1:PORT MODEL=NAME REQUEST_RATE=0.5 \
#     EXTRA_INPUTS='{"priority": 0, "ignore_eos": true}' bash scripts/aiperf_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${FLOWPREFILL_VENV:-.venv}/bin/python
AIPERF_VENV=${AIPERF_VENV:-$HOME/.cache/flowprefill_ray/aiperf-venv}
AIPERF_VERSION=${AIPERF_VERSION:-0.13.0}
REQUESTS=${REQUESTS:-20}
CONCURRENCY=${CONCURRENCY:-2}
ISL=${ISL:-128}
OSL=${OSL:-16}
OUT=${OUT:-results/aiperf}
TARGET_URL=${TARGET_URL:-}
REQUEST_RATE=${REQUEST_RATE:-}
EXTRA_INPUTS=${EXTRA_INPUTS:-}

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # Ray on 127.0.0.1 only
unset RAY_ADDRESS
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}  # a throwaway local cluster (docs/DEPLOY.md)

if [[ ! -x "$AIPERF_VENV/bin/aiperf" ]]; then
  echo "[aiperf_check] installing aiperf==$AIPERF_VERSION into $AIPERF_VENV" >&2
  python3 -m venv "$AIPERF_VENV"
  "$AIPERF_VENV/bin/pip" install -q --upgrade pip
  "$AIPERF_VENV/bin/pip" install -q "aiperf==$AIPERF_VERSION"
fi

# The tokenizer aiperf counts tokens with: the served model's own checkpoint directory.
TOKENIZER=${TOKENIZER:-$(HF_HUB_OFFLINE=1 "$PY" -m flowprefill_ray prepare-model | tail -n 1)}
mkdir -p "$OUT"
if [[ -n "$TARGET_URL" ]]; then
  URL=$TARGET_URL
  MODEL=${MODEL:?MODEL must name the served model when TARGET_URL is set}
else
  PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  CONFIG=$(mktemp --suffix=.yaml)
  sed "s/^  port: 8000$/  port: $PORT/" deployments/local.yaml > "$CONFIG"
  MODEL=$("$PY" - "$CONFIG" <<'PYEOF'
import sys, yaml
from flowprefill_ray.serve.config import ServeAppArgs
config = yaml.safe_load(open(sys.argv[1]))
print(ServeAppArgs.model_validate(config["applications"][0]["args"]).served_model_name())
PYEOF
  )

  LOG="$OUT/serve.log"
  # Job control on while starting it: a background job of a plain script ignores SIGINT,
  # and SIGINT is how serve run shuts down cleanly.
  set -m
  # --address local: always a new private cluster, never one that happens to run on this machine.
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "${PY%/python}/serve" run --address local "$CONFIG" \
    >"$LOG" 2>&1 &
  SERVE_PID=$!
  set +m
  cleanup() {
    # SIGINT is serve run's Ctrl-C: it deletes the app and stops the Ray instance it started.
    # (No `ray stop`: that would stop every Ray cluster of this user on the machine.)
    kill -INT "$SERVE_PID" 2>/dev/null || true
    wait "$SERVE_PID" 2>/dev/null || true
    rm -f "$CONFIG"
  }
  trap cleanup EXIT

  echo "[aiperf_check] waiting for http://127.0.0.1:$PORT/health (model load + predictor profile)" >&2
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVE_PID" 2>/dev/null; then echo "serve run exited; see $LOG" >&2; exit 1; fi
    sleep 2
  done
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "not healthy; see $LOG" >&2; exit 1; }

  URL="http://127.0.0.1:$PORT"
fi

if [[ -n "$REQUEST_RATE" ]]; then LOAD=(--request-rate "$REQUEST_RATE"); else LOAD=(--concurrency "$CONCURRENCY"); fi
if [[ -n "$EXTRA_INPUTS" ]]; then LOAD+=(--extra-inputs "$EXTRA_INPUTS"); fi

# aiperf fails to load a local tokenizer path with HF_HUB_OFFLINE set; unset it makes no hub
# call for a local directory (docs/DEPLOY.md).
env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE "$AIPERF_VENV/bin/aiperf" profile \
  --model "$MODEL" --url "$URL" \
  --endpoint-type completions --streaming \
  --tokenizer "$TOKENIZER" \
  --isl "$ISL" --osl "$OSL" \
  "${LOAD[@]}" --request-count "$REQUESTS" \
  --ui-type none --artifact-dir "$OUT" 2>&1 | tee "$OUT/aiperf.log"
echo "[aiperf_check] artifacts in $OUT" >&2
