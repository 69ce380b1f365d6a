"""Fixtures shared by the kernel tests: fresh random inputs each run, reproducible from the printed seed
(``MISTRALRS_TEST_SEED=<seed>`` replays a run)."""

from __future__ import annotations

import hashlib
import os
import secrets

import numpy as np
import pytest
import torch

RUN_SEED = int(os.environ.get("MISTRALRS_TEST_SEED") or secrets.randbits(32))


def _test_seed(request) -> int:
    seed = int.from_bytes(hashlib.sha256(f"{RUN_SEED}:{request.node.nodeid}".encode()).digest()[:8], "little")
    print(f"MISTRALRS_TEST_SEED={RUN_SEED} (test seed {seed})")
    return seed


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A numpy generator for this test and this run."""
    return np.random.default_rng(_test_seed(request))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A torch generator for this test and this run."""
    return torch.Generator().manual_seed(_test_seed(request))
