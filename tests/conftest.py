"""Hypothesis profiles and the device fixture shared by every test.

Profiles (choose with ``pytest --hypothesis-profile=NAME``):
    fast      the default: few examples per property, the whole suite in minutes on
              2 CPU cores; derandomized when the CI variable is set, so a CI run is
              reproducible.
    thorough  deep runs: many examples, fresh randomness each run.
Hypothesis's own ``ci`` profile is left as it is.

Markers (declared in pyproject.toml): ``slow`` for a test of more than a few seconds (the
notebooks, the inductor compilations, multi-process training); every test whose name
says ``inductor`` is marked ``slow`` here, wherever it is. ``python -m pytest -m "not
slow"`` is the quick subset for development; the default run, and CI, run everything.
"""

from __future__ import annotations

import os

# torch.compile's inductor backend compiles its C++ kernels in a pool of worker processes
# by default, each starting its own Python and importing torch: for the few small graphs
# the tests compile, that pool cost 9 s of CPU out of 24 s (tests/ -k inductor, measured
# as the CPU time of the whole process tree). One thread in this process does the same
# work. Set before anything imports torch._inductor.config, which reads it; the
# environment wins if it says otherwise.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# One torch thread per test process (and, through the environment, per notebook kernel and
# per subprocess). The tests' tensors are small: a second intra-op thread gains little on
# an idle machine, and on a shared one it costs dearly: when another process holds the
# other core, the two OpenMP threads wait for each other at every parallel operation.
# Measured on this 2-core machine under load (tests/test_feature_fusion.py -k "maps_agree
# or commutes_with_position or swapping_inputs", CPU of the process tree): 33.8 s with
# torch's default 2 threads, 9.4 s with 1. Parallelism comes from `pytest -n 2` instead
# (pytest-xdist: one process per core). OMP_NUM_THREADS=2 in the environment overrides.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # if torch was imported before

settings.register_profile(
    "fast",
    max_examples=20,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile("fast")

# On CUDA, cuDNN convolutions in float32 default to TF32 (10 bits of mantissa), which no
# float32 tolerance of ours would survive. The oracle comparisons mean true float32.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


def available_devices() -> list[str]:
    """The CPU and every accelerator torch can see here."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


DEVICES = available_devices()


@pytest.fixture(params=DEVICES, scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """Run a test once per available device."""
    return request.param


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every inductor test ``slow`` (code generation takes 2-15 s per module)."""
    for item in items:
        if "inductor" in item.name and "slow" not in item.keywords:
            item.add_marker(pytest.mark.slow)
