#!/usr/bin/env bash
# Everything to run on a CUDA machine, in one go: build the extension with its CUDA kernels, run
# the whole test suite (the `gpu`-marked tests included), the op benchmarks, received_attention
# against the eager map, and the end-to-end benchmark (pre-LLM and in-LLM methods).  Logs and
# results land in $RESULTS (default benchmarks/results/gpu-<date>), at most 10 files.  Needs torch, triton, pytest and pytest-benchmark already installed (no downloads).
#
#   bash scripts/gpu_check.sh                 # everything
#   QUICK=1 bash scripts/gpu_check.sh         # --quick benchmarks (a few minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu-$(date -u +%F)}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
quick=${QUICK:+--quick}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)"
  date -u
} > "$RESULTS/machine.txt" 2>&1

# The build: --no-deps since the machine may have no package registry.
timeout 900 "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RESULTS/build.log" 2>&1 \
  || echo "build failed: see $RESULTS/build.log"
"$PY" -c "import visprune; print(visprune.available_backends())" >> "$RESULTS/build.log" 2>&1

timeout 1200 "$PY" -m pytest -q -rs tests > "$RESULTS/tests.log" 2>&1
tail -n 3 "$RESULTS/tests.log"

timeout 1800 "$PY" -m visprune.bench --device cuda $quick --json "$RESULTS/bench.json" \
  > "$RESULTS/bench.txt" 2>&1
tail -n 40 "$RESULTS/bench.txt"

timeout 600 "$PY" benchmarks/bench_attention.py --device cuda $quick \
  --json "$RESULTS/attention.json" > "$RESULTS/attention.txt" 2>&1
tail -n 8 "$RESULTS/attention.txt"

timeout 1200 "$PY" benchmarks/e2e.py --json "$RESULTS/e2e.json" > "$RESULTS/e2e.txt" 2>&1
tail -n 20 "$RESULTS/e2e.txt"
for visual in image video; do         # Qwen2.5-VL-7B shapes: keep 25 % / 11 % of the tokens
  timeout 1200 "$PY" benchmarks/e2e.py --model qwen2_5_vl --visual $visual \
    --json "$RESULTS/e2e_qwen_$visual.json" > "$RESULTS/e2e_qwen_$visual.txt" 2>&1
  tail -n 20 "$RESULTS/e2e_qwen_$visual.txt"
done
