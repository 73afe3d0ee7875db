#!/usr/bin/env bash
# On the device machine: start `certiprune serve`, submit a scripted ResNet-18 job with the default
# device (auto), and show that the worker ran it on CUDA (result.device, result.evaluator).
set -euo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
PORT=8123
python3 - <<'PY'
import numpy as np, torch, torchvision
torch.manual_seed(0)
m = torchvision.models.resnet18(num_classes=10).eval()
x = torch.randn(4000, 3, 32, 32)
with torch.no_grad():
    y = m(x).argmax(1)
torch.jit.script(m).save("/tmp/r18.pt")
np.savez("/tmp/r18_cal.npz", x=x.numpy(), y=y.numpy())
PY
python3 -m service.cli serve --port $PORT --data-dir /tmp/cp-data > "$OUT/server.log" 2>&1 &
for _ in $(seq 1 120); do curl -fsS http://127.0.0.1:$PORT/healthz >/dev/null 2>&1 && break; sleep 0.5; done
python3 -m service.cli submit /tmp/r18.pt --data /tmp/r18_cal.npz --server http://127.0.0.1:$PORT \
  --epsilon 0.05 --sparsities 0.0,0.05,0.1,0.2,0.3,0.4,0.5 --wait --quiet --out /tmp/r18_pruned.pt --report "$OUT/result.json"
python3 - <<'PY'
import json, os
r = json.load(open(os.environ.get("OUT", "/tmp/out") + "/result.json"))
r = r.get("result", r)
print("device:", r["device"], "| evaluator:", r.get("evaluator"), "| certified:", r["certified_sparsity"],
      "| timings:", r.get("timings"))
assert r["device"] == "cuda", "the job did not run on CUDA"
PY
grep -i "slot\|started in process" "$OUT/server.log" | head -5
