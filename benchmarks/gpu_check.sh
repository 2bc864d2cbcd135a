#!/bin/bash
# One device-machine session (see ../.library/device): the CUDA tier's tests, the expert store's (on CUDA by default
# there), the GGUF device path's, NVML detection and energy, and the VRAM-tier benchmark. Carry .whl (platformdirs,
# gguf and diskcache wheels, absent from that image) and .devsite (a copy of the venv's llama_cpp package: ctypes over
# its own shared libraries, so it loads under that image's Python; the GGUF device test's references come from
# llama.cpp) and .devsite/tokenizer.gguf: `bash benchmarks/gpu_check.sh prepare` makes all three here. The two tests
# that run the embedded model itself are left out there. BENCH_TIMEOUT=skip leaves the benchmark out. Results land
# in $OUT.
if [ "$1" = prepare ]; then  # here, on the development machine, before the device run
  set -e; grep -qx '/.whl/' .git/info/exclude 2>/dev/null || printf '/.whl/\n/.devsite/\n' >> .git/info/exclude
  mkdir -p .whl .devsite; rm -rf .devsite/llama_cpp; cp -a .venv/lib/python3.*/site-packages/llama_cpp .devsite/
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl platformdirs==4.14.9 gguf==0.19.0 diskcache==5.6.3 sqlite-utils==4.2.1 \
    sqlite-fts4==1.0.3 click-default-group==1.2.4
  # the test models take their tokenizer from the embedded SmolLM2 (98 MB, over the carry limit): its fields alone
  .venv/bin/python - <<'PY'
import gguf, sys
sys.path.insert(0, "tests")
from synthetic_moe import _embedded_gguf, _tokenizer_fields
w = gguf.GGUFWriter(".devsite/tokenizer.gguf", "llama")
for key, (value, vtype, sub_type) in _tokenizer_fields(_embedded_gguf()).items():
    w.add_key_value(key, value, vtype, sub_type)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
PY
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/.devsite:$PWD PYTHONUNBUFFERED=1 LOCALMOE_HOME=/tmp/lmhome \
  LOCALMOE_TEST_TOKENIZER_GGUF=$PWD/.devsite/tokenizer.gguf
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Installed, the package holds assets/ and ui/ as localmoe.assets and localmoe.ui; this tree is not installed there
made=(); for d in assets ui; do [ -e localmoe/$d ] || { ln -s ../$d localmoe/$d && made+=(localmoe/$d); }; done
trap 'rm -f "${made[@]}"' EXIT
nvidia-smi --query-gpu=name,memory.total,memory.free,power.draw --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 3 --dist loadfile --basetemp=/tmp/pt -rs tests/test_cuda.py tests/test_expert_store.py tests/test_gguf_device.py \
  --deselect tests/test_expert_store.py::test_engine_options_without_a_checkpoint_are_refused \
  --deselect tests/test_expert_store.py::test_engine_options_on_a_gguf_are_refused 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
# a user's view of the same path: `ask` from the CLI on a tiny quantised MoE the tests built, on the GPU
q=$(find /tmp/pt -path '*qwen3_moe/Q4_K_M.gguf' | head -1)
for dev in cuda cpu; do  # greedy: the same tokens on both
  [ -n "$q" ] && timeout 90 python3 -m localmoe ask -m "$q" --backend torch --device $dev --json --max-tokens 8 \
    --temperature 0 --no-log "Hello there" > "$OUT/ask_$dev.json" 2>&1; head -c 1200 "$OUT/ask_$dev.json"; echo
done
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
[ "$BENCH_TIMEOUT" = skip ] && exit 0
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_tiers.py --dir /tmp/mid --out "$OUT/gpu_tiers.json" --tokens 64 \
  2>&1 | tee "$OUT/gpu_tiers.log"
