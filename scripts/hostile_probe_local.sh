#!/usr/bin/env bash
# The hostile-user probe (scripts/hostile_probe.py) against the shipped deployment, as a user
# runs it: a private local Ray with its metrics port on, `serve run deployments/local.yaml`
# (embedded SmolLM2), the probe, then everything stopped. Loopback only. Writes
# docs/results/hostile_probe.json; exits with the probe's status.
#   bash scripts/hostile_probe_local.sh
# It ends with `ray stop --force`, which stops every Ray process of this user: do not run it
# beside another Ray cluster you need.
set -u
cd "$(dirname "$0")/.."
export RAY_TMPDIR=${RAY_TMPDIR:-/tmp/fpp} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$RAY_TMPDIR"
PORT=46379; METRICS=46380
free() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
.venv/bin/ray start --head --disable-usage-stats --num-cpus=4 --include-dashboard=false \
  --port=$PORT --metrics-export-port=$METRICS --ray-client-server-port=$(free) \
  --dashboard-agent-listen-port=$(free) --dashboard-agent-grpc-port=$(free) \
  --runtime-env-agent-port=$(free) > $RAY_TMPDIR/ray_start.log 2>&1 || { cat $RAY_TMPDIR/ray_start.log; exit 1; }
.venv/bin/serve run --address 127.0.0.1:$PORT deployments/local.yaml > $RAY_TMPDIR/serve.log 2>&1 &
SERVE=$!
for i in $(seq 1 200); do curl -s -m 2 http://127.0.0.1:8000/health | grep -q ok && break; sleep 2; done
curl -s http://127.0.0.1:8000/health; echo
.venv/bin/python scripts/hostile_probe.py --url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \
  --metrics-url http://127.0.0.1:$METRICS/metrics --out docs/results/hostile_probe.json
RC=$?
kill -TERM $SERVE; sleep 2; kill -9 $SERVE 2>/dev/null
.venv/bin/ray stop --force > /dev/null 2>&1
echo "probe rc=$RC"
exit $RC
