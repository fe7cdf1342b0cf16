"""tests/vllm/ run only where vLLM is installed (scripts/vllm_check.sh's environment); elsewhere
nothing here is collected, so the main test run neither imports vLLM nor waits for it."""
import importlib.util
import os


def _has_vllm() -> bool:
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return False
    # tests/vllm itself is a namespace-package candidate named "vllm" when tests/ is on sys.path
    return spec is not None and spec.origin is not None


if _has_vllm():
    # Eager, in-process engines on the CPU (3-6 s each instead of ~45 s).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    collect_ignore_glob = []
else:
    collect_ignore_glob = ["test_*.py"]
