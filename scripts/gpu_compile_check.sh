#!/usr/bin/env bash
# Compile every GPU kernel of visprune for sm_90 (H100 / H200) on a machine without a GPU and
# fail on any compile error or register spill.
#   * CUDA: csrc/cuda/kernels.cu (nvcc 13.0 from the registry's wheels) and csrc/ops.cpp (the host
#     compiler), both with -DVISPRUNE_WITH_CUDA and torch's cpp_extension flags; compile only,
#     ptxas -v for the kernels (scripts/gpu_compile/cuda_sm90.py).
#   * Triton: every kernel the launchers compile at the LLaVA-1.5 / LLaVA-NeXT / video shapes in
#     bf16, fp16 and fp32, through a stand-in driver for an sm_90 device
#     (scripts/gpu_compile/triton_sm90.py), with the installed Triton and with Triton 3.6 (the GPU
#     machine's) in its own venv.
# The toolchains go to $GPU_COMPILE_CACHE (default .gpu_compile/) and are reused from there; the
# three compile steps run side by side.  Prints one table (registers, spills, shared memory per
# kernel) and a summary line, also kept in $GPU_COMPILE_CACHE/run/report.txt with each step's
# log and JSON results; exit status 1 on any compile error or spill.
#
#   bash scripts/gpu_compile_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CACHE=${GPU_COMPILE_CACHE:-.gpu_compile}
# CUDA 13.0, as the GPU machine and the registry's CUDA torch 2.13 (crt and nvvm pinned too, or
# pip mixes in 13.x releases).  The -cu12 wheels ship no nvcc front end.
CUDA_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
             nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
GPU_TRITON=3.6.0
STEP_TIMEOUT=${GPU_COMPILE_TIMEOUT:-1500}
PIP=(-m pip install -q --no-deps --disable-pip-version-check --root-user-action=ignore)

# ready DIR STAMP PROBE...: DIR holds a complete install of STAMP (the stamp is written last,
# so an interrupted install is redone) and PROBE runs.
ready() {
  local dir=$1 stamp=$2; shift 2
  [[ -f $dir/.stamp && $(<"$dir/.stamp") == "$stamp" ]] && "$@" >/dev/null 2>&1
}

mkdir -p "$CACHE"
t0=$SECONDS

cuda=$CACHE/cuda-13.0
cuda_home=$cuda/nvidia/cu13
if ! ready "$cuda" "${CUDA_WHEELS[*]}" "$cuda_home/bin/nvcc" --version; then
  echo "installing ${CUDA_WHEELS[*]} into $cuda"
  rm -rf "$cuda"
  "$PY" "${PIP[@]}" --target "$cuda" "${CUDA_WHEELS[@]}"
  echo "${CUDA_WHEELS[*]}" > "$cuda/.stamp"
fi

# The installed Triton, and Triton $GPU_TRITON unless that is the installed one.  The overlay
# venv sees what $PY sees (its torch and visprune, from a venv, a conda env or the system Python)
# with its own Triton first (scripts/gpu_compile/overlay.py); --no-deps: no other torch.  It is
# made for one calling interpreter: the stamp names it.
pythons=("$PY")
if [[ $("$PY" -c 'import triton; print(triton.__version__)') != "$GPU_TRITON" ]]; then
  venv=$CACHE/triton-$GPU_TRITON
  stamp="triton==$GPU_TRITON for $("$PY" -c 'import sys; print(sys.prefix)')"
  if ! ready "$venv" "$stamp" "$venv/bin/python" -c \
      "import triton, visprune; assert triton.__version__ == '$GPU_TRITON'"; then
    echo "installing triton==$GPU_TRITON into $venv"
    rm -rf "$venv"
    site=$("$PY" scripts/gpu_compile/overlay.py "$venv")
    "$PY" "${PIP[@]}" --target "$site" "triton==$GPU_TRITON"
    echo "$stamp" > "$venv/.stamp"
  fi
  pythons+=("$venv/bin/python")
fi
echo "toolchains ready in $((SECONDS - t0)) s; compiling for sm_90"

run=$CACHE/run
rm -rf "$run"
mkdir -p "$run"
results=("$run/cuda.json:$run/cuda.log")
timeout "$STEP_TIMEOUT" "$PY" scripts/gpu_compile/cuda_sm90.py --cuda-home "$cuda_home" \
  --work "$run/cuda" --out "$run/cuda.json" > "$run/cuda.log" 2>&1 &
for i in "${!pythons[@]}"; do
  results+=("$run/triton-$i.json:$run/triton-$i.log")
  timeout "$STEP_TIMEOUT" "${pythons[$i]}" scripts/gpu_compile/triton_sm90.py \
    --out "$run/triton-$i.json" > "$run/triton-$i.log" 2>&1 &
done
wait || true        # each step's outcome is in its results file, checked by the report
"$PY" scripts/gpu_compile/report.py "${results[@]}" | tee "$run/report.txt" && status=0 || status=$?
echo "gpu_compile_check: $((SECONDS - t0)) s in all"
exit "$status"
