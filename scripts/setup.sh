#!/usr/bin/env bash
# Set up visprune on a fresh machine: torch (only if missing), then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch==2.13.0 is the CPU build here; never let an install step pull a newer (CUDA) torch.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
# ninja builds the C++ extension visprune._C (csrc/) in parallel; without a C++ compiler the
# package installs without it (see setup.py; VISPRUNE_NO_EXT=1 skips it on purpose).
"$PY" -m pip install -q ninja
# --no-build-isolation: the build uses the installed torch instead of fetching another one.
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
