import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def shared_data() -> Path:
    """../shared/data beside the checkout (or $UNROLL_DATA)."""
    return Path(os.environ.get("UNROLL_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Float64, eval, and BatchNorm statistics/affines far from their identity defaults, so BN is really tested."""
    from unroll.verify import randomize_batch_norm

    return randomize_batch_norm(model.double().eval(), seed)


@pytest.fixture(scope="module")
def one_thread():
    """Training-loop tests run torch single-threaded: tiny kernels are slower with 2 threads on a shared box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Hypothesis profiles (tests/test_fuzz.py). fuzz-ci, the default: derandomised, so every run (and CI) draws the same
# examples, and no example database is written. fuzz-long: fresh random examples, kept in .hypothesis/ so a failure
# replays first next time. Select with HYPOTHESIS_PROFILE=fuzz-long or pytest --hypothesis-profile=fuzz-long.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev extra; only test_fuzz.py needs it
    pass
else:
    _common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("fuzz-ci", max_examples=100, derandomize=True, database=None, **_common)
    settings.register_profile("fuzz-long", max_examples=int(os.environ.get("FUZZ_EXAMPLES", 5000)), **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuzz-ci"))
