#!/usr/bin/env bash
# Everything to run on a CUDA machine, in one go and within 8 minutes (a lease's command, less its
# start): the machine's versions; the package and its CUDA extension built for sm_90; every op and
# method on every backend against the reference, then the gpu-marked tests; compute-sanitizer
# memcheck and racecheck; the quick op benchmark against the DESIGN targets; received_attention
# against SDPA and one end-to-end prefill per model family at 7B shapes.  Each stage has a time
# budget and is cut at it, keeping what it wrote; the plan and the mechanism are in
# scripts/gpu/check.py.  Results (summary.md, results.json, logs.txt) land in $OUT when it is
# set, else in benchmarks/results/gpu-<date>/.  Needs torch, triton, pytest and transformers
# installed (no downloads).
#
#   bash scripts/gpu_check.sh                 # the plan, 480 s
#   bash scripts/gpu_check.sh --budget 900    # every stage's budget scaled
#   bash scripts/gpu_check.sh --dry-run       # print and check the plan; no GPU needed
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1           # progress lines reach a terminal that is cut off
exec "${PYTHON:-python3}" scripts/gpu/check.py "$@"
