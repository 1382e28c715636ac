#!/usr/bin/env bash
# The accelerator check in one script (docs/benchmarks.md "Device check"): on a CUDA device, in at most 8 minutes,
#   1. compiled == eager      (tiny-moe densa model: compiled forward's logits vs eager's)
#   2. grouped MoE == reference (bf16 on CUDA, where the grouped-GEMM kernel runs; fp32 on CPU)
#   3. cached == uncached in bf16 (prefill + one cached step vs one full forward)
# then the quick benches, each writing its JSON under OUT (default runs/device-check).
# `--cpu` runs the same script end to end on the CPU. Usage: [CHECKS_ONLY=1] scripts/device_check.sh [--cpu] [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [[ "${1:-}" == "--cpu" ]]; then DEVICE=cpu; shift; fi
OUT=${1:-runs/device-check}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
START=$(date +%s)

echo "== checks on $DEVICE"
DEVICE=$DEVICE timeout 300 "$PY" - <<'EOF'
import os

import torch

from densa.config import from_preset
from densa.model.compile import inference_steps
from densa.model.model import DensaModel
from densa.model.moe import MoE, moe_reference

device = os.environ["DEVICE"]
if device == "cuda" and not torch.cuda.is_available():
    raise SystemExit("no CUDA device here: run with --cpu")
torch.manual_seed(0)
half = torch.bfloat16 if device == "cuda" else torch.float32
ids = torch.randint(0, 256, (2, 40), device=device)

# 1. compiled == eager: decode steps through densa's one compile switch (CUDA graphs on CUDA), fp32
model = DensaModel(from_preset("tiny-moe")).to(device).eval()
logits = {}
with torch.no_grad():
    for mode in ("off", "on"):
        steps = inference_steps(model, mode)
        cache = model.new_cache(ids.shape[1])
        steps.prefill(ids[:, :32], cache)
        logits[mode] = torch.stack([steps.decode(ids[:, t : t + 1], cache)[0] for t in range(32, 40)])
torch.testing.assert_close(logits["on"], logits["off"], rtol=1e-4, atol=1e-4)
print("ok  compiled == eager (8 decode steps)")

# 2. grouped MoE == reference (ids < E only; identity/null handling is MoE.forward's, tested on CPU)
layer = MoE(from_preset("tiny-moe")).to(device, half).eval()
layer.experts.impl = "grouped_mm" if device == "cuda" else "auto"
x = torch.randn(64, 64, device=device, dtype=half)
r = layer.gate(x)
E = layer.num_experts
with torch.no_grad():
    fast = layer.experts(x, r.ids_TK, r.weights_TK)
    ref = moe_reference(x, r.ids_TK.clamp(max=E), r.weights_TK, layer.experts.gate_up_proj, layer.experts.down_proj,
                        num_null=1)
tol = 2e-2 if half == torch.bfloat16 else 1e-5
torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)
print(f"ok  grouped MoE == reference ({half}, grouped_mm used: {layer.experts.uses_grouped_mm(x)})")
layer.experts.impl = "gathered"  # the small-batch path (auto on CUDA for T·K <= E)
with torch.no_grad():
    torch.testing.assert_close(layer.experts(x[:2], r.ids_TK[:2], r.weights_TK[:2]), ref[:2], rtol=tol, atol=tol)
print("ok  gathered MoE == reference (2 tokens)")

# 3. cached == uncached in bf16
model = DensaModel(from_preset("tiny-moe")).to(device, torch.bfloat16).eval()
with torch.no_grad():
    full = model(ids).logits.float()
    cache = model.new_cache()
    first = model(ids[:, :-1], cache=cache).logits.float()
    step = model(ids[:, -1:], cache=cache).logits.float()
torch.testing.assert_close(first, full[:, :-1], rtol=5e-2, atol=5e-2)
torch.testing.assert_close(step, full[:, -1:], rtol=5e-2, atol=5e-2)
print("ok  cached == uncached (bf16)")
EOF

if [[ -n "${CHECKS_ONLY:-}" ]]; then exit 0; fi  # CHECKS_ONLY=1: the three checks alone
echo "== benches (quick) -> $OUT"
for bench in decode prefill moe attention train serve; do
    left=$(( 480 - ($(date +%s) - START) ))
    if (( left < 30 )); then echo "skip $bench: the 8-minute budget is spent"; continue; fi
    timeout "$left" "$PY" -m densa bench "$bench" --quick --json "$OUT/bench-$bench.json" \
        || echo "FAILED bench $bench (exit $?)"
done
echo "device check done in $(( $(date +%s) - START )) s"
