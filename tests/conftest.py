"""Shared test set-up: the device and backends under test, and fresh random data per test.

FASTNORM_TEST_DEVICE picks the device (default: cuda when available, else cpu);
FASTNORM_TEST_BACKENDS (comma-separated) restricts the backends (default: every backend that
can run on the device); FASTNORM_SEED fixes the session's random seed (printed in the header).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from fastnorm.backends import BACKENDS

SESSION_SEED = int(os.environ.get("FASTNORM_SEED", random.SystemRandom().randrange(2**31)))
DEVICE = torch.device(os.environ.get("FASTNORM_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def _backends_under_test() -> list[str]:
    probe = torch.empty(0, device=DEVICE)
    runnable = [name for name, b in BACKENDS.items() if not b.not_supported_reasons(probe)]
    wanted = os.environ.get("FASTNORM_TEST_BACKENDS")
    if wanted:
        names = [n.strip() for n in wanted.split(",") if n.strip()]
        missing = [n for n in names if n not in runnable]
        if missing:
            raise pytest.UsageError(f"FASTNORM_TEST_BACKENDS names backends that cannot run on {DEVICE}: {missing}")
        return names
    return runnable


BACKENDS_UNDER_TEST = _backends_under_test()
KERNEL_BACKENDS = [b for b in BACKENDS_UNDER_TEST if b != "reference"]
# The backends under test that have normalize_advantages on the device (adv_backend, adv_kernel_backend).
ADVANTAGE_BACKENDS = [b for b in BACKENDS_UNDER_TEST
                      if not BACKENDS[b].not_supported_reasons(torch.empty(0, device=DEVICE), "normalize_advantages")]
ADVANTAGE_KERNEL_BACKENDS = [b for b in ADVANTAGE_BACKENDS if b != "reference"]
# The backends under test that have the split ops batch_moments and merge_normalize on the device
# (split_backend).
SPLIT_BACKENDS = [b for b in BACKENDS_UNDER_TEST
                  if not any(BACKENDS[b].not_supported_reasons(torch.empty(0, device=DEVICE), op)
                             for op in ("batch_moments", "merge_normalize"))]
# The backends under test that have the split advantage ops advantage_moments and
# normalize_advantages_from on the device (adv_split_backend).
ADVANTAGE_SPLIT_BACKENDS = [b for b in BACKENDS_UNDER_TEST
                            if not any(BACKENDS[b].not_supported_reasons(torch.empty(0, device=DEVICE), op)
                                       for op in ("advantage_moments", "normalize_advantages_from"))]


def pytest_report_header(config):
    return [f"fastnorm: device={DEVICE}, backends={BACKENDS_UNDER_TEST}, FASTNORM_SEED={SESSION_SEED}"]


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the session seed and the test id: fresh data each session,
    reproducible with FASTNORM_SEED."""
    g = torch.Generator(device="cpu")
    g.manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", BACKENDS_UNDER_TEST)
    if "kernel_backend" in metafunc.fixturenames:
        metafunc.parametrize("kernel_backend", KERNEL_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no kernel backend runs on {DEVICE}"))])
    if "split_backend" in metafunc.fixturenames:
        metafunc.parametrize("split_backend", SPLIT_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no backend under test has batch_moments and merge_normalize on {DEVICE}"))])
    if "adv_split_backend" in metafunc.fixturenames:
        metafunc.parametrize("adv_split_backend", ADVANTAGE_SPLIT_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no backend under test has advantage_moments and normalize_advantages_from on {DEVICE}"))])
    if "adv_backend" in metafunc.fixturenames:
        metafunc.parametrize("adv_backend", ADVANTAGE_BACKENDS)
    if "adv_kernel_backend" in metafunc.fixturenames:
        metafunc.parametrize("adv_kernel_backend", ADVANTAGE_KERNEL_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
            reason=f"no kernel backend has normalize_advantages on {DEVICE}"))])
