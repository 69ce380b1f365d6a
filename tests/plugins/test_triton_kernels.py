"""The Triton kernel plugins (`kernels/triton_*`) against their torch references, in interpreter mode
(``TRITON_INTERPRET=1``, CPU tensors): fresh random inputs each run, awkward sizes (not multiples of the
blocks, one token, an empty batch), bf16 and fp32. Shapes stay tiny: the interpreter runs each program
in numpy. Longer cases are marked slow. Skipped when triton is not installed (`pip install
'mistralrs[cuda]'`, or `nox -s triton`)."""

from __future__ import annotations

import pytest
import torch

from mistralrs.nn import torch_ops
from tests.helpers.triton_interp import interpreted, randn, seeded, triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")

# bf16: one ulp (the interpreter's fp32 -> bf16 cast truncates where a GPU rounds to nearest).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request) -> torch.Generator:
    return seeded(request)


@pytest.fixture(scope="module")
def norm():
    return interpreted("mistralrs_plugins.kernels.triton_norm.kernels")


@pytest.fixture(scope="module")
def rope():
    return interpreted("mistralrs_plugins.kernels.triton_rotary.kernels")


@pytest.fixture(scope="module")
def act():
    return interpreted("mistralrs_plugins.kernels.triton_activation.kernels")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[want.dtype])


# -- rms_norm -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (5, 33), (2, 3, 100), (0, 16)])
@pytest.mark.parametrize("unit", [False, True])
def test_rms_norm(norm, gen, dtype, shape, unit):
    x = randn(gen, *shape, dtype=dtype)
    w = randn(gen, shape[-1], dtype=dtype, scale=0.5)
    close(norm.rms_norm(x, w, 1e-6, unit), torch_ops.rms_norm(x, w, 1e-6, unit))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 24), (7, 65), (0, 8)])
def test_fused_add_rms_norm(norm, gen, dtype, shape):
    x, r = randn(gen, *shape, dtype=dtype), randn(gen, *shape, dtype=dtype)
    w = randn(gen, shape[-1], dtype=dtype)
    y, h = norm.fused_add_rms_norm(x, r, w, 1e-5)
    y_ref, h_ref = torch_ops.fused_add_rms_norm(x, r, w, 1e-5)
    close(h, h_ref)  # in fp32 exactly the reference's sum (the interpreter truncates bf16 casts: 1 ulp)
    if dtype == torch.float32:
        assert torch.equal(h, h_ref)
    close(y, y_ref)


def test_rms_norm_strided_rows(norm, gen):
    x = randn(gen, 4, 40)[:, :20]  # rows with a stride: a view of a wider tensor
    w = randn(gen, 20)
    close(norm.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))


def test_rms_norm_outside_the_interpreter_is_the_reference(norm, gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w = randn(gen, 2, 8), randn(gen, 8)
    assert torch.equal(norm.rms_norm(x, w, 1e-6), torch_ops.rms_norm(x, w, 1e-6))


# -- rotary -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,H,D,R", [(1, 1, 8, None), (3, 5, 24, None), (4, 2, 20, 12), (0, 4, 16, None),
                                     (2, 17, 6, 4)])
def test_rotary(rope, gen, dtype, interleaved, T, H, D, R):
    x = randn(gen, T, H, D, dtype=dtype)
    ang = randn(gen, T, (R or D) // 2, scale=3.0)
    cos, sin = ang.cos(), ang.sin()
    close(rope.rotary(x, cos, sin, R, interleaved), torch_ops.rotary(x, cos, sin, R, interleaved))


def test_rotary_on_a_slice_of_qkv(rope, gen):
    qkv = randn(gen, 3, 6 * 8, dtype=torch.bfloat16)
    q = qkv[:, : 4 * 8].view(3, 4, 8)  # token stride 48, head stride 8: a view, not a copy
    ang = randn(gen, 3, 4)
    close(rope.rotary(q, ang.cos(), ang.sin()), torch_ops.rotary(q, ang.cos(), ang.sin()))


# -- gated activations --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2), (3, 70), (2, 2, 36), (0, 8)])
def test_silu_and_mul(act, gen, dtype, shape):
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    close(act.silu_and_mul(x), torch_ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(1, 6), (4, 130)])
def test_gelu_and_mul(act, gen, dtype, approximate, shape):
    x = randn(gen, *shape, dtype=dtype, scale=2.0)
    close(act.gelu_and_mul(x, approximate), torch_ops.gelu_and_mul(x, approximate))


def test_silu_and_mul_over_more_than_one_block(act, gen, monkeypatch):
    monkeypatch.setattr(act, "BLOCK", 16)
    x = randn(gen, 2, 2 * 37)
    close(act.silu_and_mul(x), torch_ops.silu_and_mul(x))
