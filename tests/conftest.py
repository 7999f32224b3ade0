"""Hypothesis profiles and the device fixture shared by every test.

Profiles (choose with ``pytest --hypothesis-profile=NAME``):
    fast      the default: few examples per property, the whole suite in minutes on
              2 CPU cores; derandomized when the CI variable is set, so a CI run is
              reproducible.
    thorough  deep runs: many examples, fresh randomness each run.
Hypothesis's own ``ci`` profile is left as it is.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

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
