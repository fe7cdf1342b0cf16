import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter; the variable must be set
# before Triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Hypothesis profiles of the property-based tests (tests/test_fuzz.py selects one; the test
# sets its own example count).  "visprune-fuzz" is what CI runs: fixed examples, no example
# database written, no per-example deadline (the Triton interpreter's first call is slow).
# "visprune-fuzz-large" (VISPRUNE_FUZZ=large) draws fresh examples on every run.
# Each example is built from one drawn seed, so shrinking (towards other seeds) would only
# spend time: a failure reports the first failing seed.
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    settings.register_profile(
        "visprune-fuzz", derandomize=True, database=None, deadline=None, print_blob=True,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    settings.register_profile("visprune-fuzz-large", settings.get_profile("visprune-fuzz"),
                              derandomize=False)
