#!/bin/bash
# One device-machine session (see ../.library/device): the CUDA tier's tests, the expert store's (on CUDA by default
# there), NVML detection and energy, and the VRAM-tier benchmark. Carry .whl (platformdirs and gguf wheels, absent
# from that image). Results land in $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 LOCALMOE_HOME=/tmp/lmhome
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,memory.free,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_expert_store.py tests/test_gguf_device.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
timeout 30 python3 -m localmoe hw --json > "$OUT/hw.json" 2>&1; head -c 1500 "$OUT/hw.json"; echo
timeout 60 python3 - <<'PY' 2>&1 | tee "$OUT/nvml_energy.txt"
import time, torch
from localmoe.record import meters
m, notes = meters.select_meter()
print("meter:", m, "notes:", notes)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
e0, t0 = m.read(), time.perf_counter()
for _ in range(400):
    a @ a
torch.cuda.synchronize()
e1, t1 = m.read(), time.perf_counter()
print(f"{m.kind}: {e1 - e0:.1f} J over {t1 - t0:.2f} s = {(e1 - e0) / (t1 - t0):.0f} W" if m.kind == "counter"
      else f"power now {e1:.0f} W")
PY
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_tiers.py --dir /tmp/mid --out "$OUT/gpu_tiers.json" --tokens 64 \
  2>&1 | tee "$OUT/gpu_tiers.log"
