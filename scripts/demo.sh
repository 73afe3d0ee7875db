#!/usr/bin/env bash
# The main job on the embedded default, from a clean clone: install, train a small model on
# scikit-learn's digits, start `certiprune serve`, POST the model and data, poll, download.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${CERTIPRUNE_DEMO_PORT:-8765}"

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'

python scripts/make_digits_example.py --out-dir demo-out

# Uploaded models run in a bubblewrap sandbox when it works here (docs/security.md); without it, on
# loopback with no API keys, the demo still runs — the server log warns, and we say so.
if python -c "from service.isolation import probe; import sys; sys.exit(probe() is not None)"; then
  echo "sandbox: on (bubblewrap) — the uploaded model runs isolated"
else
  echo "sandbox: OFF — $(python -c 'from service.isolation import probe; print(probe())')"
  echo "         (fine for your own models on loopback; install bubblewrap to isolate them)"
fi

certiprune serve --host 127.0.0.1 --port "$PORT" --data-dir demo-out/data &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then break; fi
  sleep 0.5
done

certiprune submit demo-out/model.pt --data demo-out/calibration.npz \
  --server "http://127.0.0.1:$PORT" --epsilon 0.02 --delta 0.1 \
  --wait --out demo-out/pruned.pt
echo
echo "The pruned model is demo-out/pruned.pt; the report: http://127.0.0.1:$PORT/v1/jobs (while the server runs)."
