"""FP8 E4M3 (``float8_e4m3fn``) bit conversions for Triton kernels, in integer operations.

Not a plugin: `triton_widen` (E4M3 weights) and `triton_attention` (the fp8 KV cache) call these inside
their kernels. Integer operations make them exact and the same on every GPU (no dependence on the GPU's
fp8 support, sm_89+) and in the interpreter, which has no fp8 type.

- `e4m3_to_f32`: bits (int32 0..255) -> float32: normal numbers assembled as fp32 bits, subnormals
  ``m * 2^-9``, 0x7f/0xff NaN (E4M3 has no infinity).
- `f32_to_e4m3`: float32 -> bits (int32 0..255), torch's cast ``x.to(torch.float8_e4m3fn)`` bit for bit
  (``fp8e4m3fn_from_fp32_value`` in torch's ``Float8_e4m3fn.h``): round to nearest even, finite values
  past the range and infinities saturate to +-448, NaN -> 0x7f with the sign, values under 2^-6 rounded
  to a subnormal by the same fp32 addition of 2^14 torch uses.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_to_f32(byte):
    """E4M3 bits (int32 0..255) -> float32."""
    e = (byte >> 3) & 0xF
    m = byte & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)  # 2^(e - 7) * (1 + m / 8)
    mag = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)  # subnormal: m * 2^-9
    mag = tl.where((byte & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where(byte >= 128, -mag, mag)


@triton.jit
def f32_to_e4m3(x):
    """float32 -> E4M3 bits (int32 0..255), as torch casts to float8_e4m3fn."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    # under 2^-6: adding 2^14 (bits 141 << 23) leaves the rounded subnormal in the low mantissa bits
    sub = ((mag.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)) & 0xFF
    # normal: rebias the exponent, round to nearest even on the 20 dropped bits, keep 7 bits
    norm = ((mag + (-120 << 23) + 0x7FFFF + ((mag >> 20) & 1)) >> 20) & 0xFF
    norm = tl.where(norm == 0x7F, 0x7E, norm)  # a carry into the NaN pattern saturates
    out = tl.where(mag < (121 << 23), sub, norm)
    out = tl.where(mag >= (1087 << 20), tl.where(mag > 0x7F800000, 0x7F, 0x7E), out)  # 480 and up, inf, NaN
    return out | sign
