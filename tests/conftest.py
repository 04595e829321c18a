"""Test configuration: float64 by default for curvature identities; hypothesis profiles.

Profiles (select with HYPOTHESIS_PROFILE): ``ci`` keeps the whole suite well under 10 minutes
on 2 cores, ``dev`` is the local default, ``thorough`` runs many more examples.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=12, derandomize=True, print_blob=True, **_common)
settings.register_profile("dev", max_examples=20, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# tiny tensors: one intra-op thread is faster (and much less fragile on a loaded 2-core box)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second intra-op thread only adds contention on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
