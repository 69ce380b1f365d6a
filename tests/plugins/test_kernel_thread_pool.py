"""The native kernels' thread pool (plugins/mistralrs_plugins/kernels/thread_pool.h): the same bits from any
calling thread, from several threads at once, after the thread count changes and in a forked child."""

from __future__ import annotations

import os
import signal
import threading

import numpy as np
import pytest
import torch

from tests.plugins.test_cpu_quant_kernels import randn, random_qweight, requires_avx2

pytestmark = requires_avx2

# Big enough to be split between threads: a GEMV over 2048 rows and a 40-row GEMM.
CASES = [(1, 2048, 1024), (40, 515, 1024)]


@pytest.fixture(scope="module")
def native():
    from mistralrs_plugins.kernels.cpu_quant import native_disabled, ops

    if native_disabled():
        pytest.skip("native kernels disabled")
    ext = ops.extension()
    assert ext is not None, ops.status()
    return ext


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(randn(rng, m, k), random_qweight("q4k", n, k, rng)) for m, n, k in CASES]


def _q4k_id():
    from mistralrs_plugins.kernels.cpu_quant import FORMATS

    return FORMATS["q4k"][3]


def test_same_bits_from_other_threads_and_concurrent_callers(native):
    inputs = _inputs()
    qtype = _q4k_id()
    expected = [native.qmatmul(x, qw, None, qtype, True) for x, qw in inputs]
    results: list[list[torch.Tensor]] = []
    errors: list[BaseException] = []

    def caller():
        try:
            for _ in range(10):
                results.append([native.qmatmul(x, qw, None, qtype, True) for x, qw in inputs])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 30
    for got in results:
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)


def test_same_bits_when_the_thread_count_changes(native):
    inputs = _inputs(1)
    qtype = _q4k_id()
    saved = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3, 2):  # 3: more threads than this 2-core machine has; the pool is rebuilt each time
            torch.set_num_threads(n)
            outs.append([native.qmatmul(x, qw, None, qtype, True) for x, qw in inputs])
    finally:
        torch.set_num_threads(saved)
    for got in outs[1:]:
        for a, b in zip(got, outs[0], strict=True):
            assert torch.equal(a, b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_a_fresh_pool(native):
    """The parent's workers do not exist in a forked child: the child must not wait for them."""
    inputs = _inputs(2)
    qtype = _q4k_id()
    expected = [native.qmatmul(x, qw, None, qtype, True) for x, qw in inputs]  # the pool is running now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 on the same bits, 1 otherwise; killed by the alarm if it hangs
        signal.alarm(60)
        code = 1
        try:
            got = [native.qmatmul(x, qw, None, qtype, True) for x, qw in inputs]
            code = 0 if all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
