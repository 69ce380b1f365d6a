"""GGML block dequantization in registers for Triton kernels (not a plugin): `dequant_tile` is what
`triton_quant`'s dequantize-matmuls and `triton_moe`'s quantized grouped GEMMs load their weights with.

`dequant_tile(rows, kk, wm, FMT)`: the fp32 weights ``[BLOCK_N, BLOCK_K]`` at columns `kk` of the rows whose
first bytes `rows` points at (canonical GGML block bytes, as GGUF and UQFF store them: nothing repacked),
masked by `wm`; the arithmetic of the GGML quantizer plugin's torch dequantizers (`quant/ggml/formats`):
``(q - 8) * d`` (q4_0), ``q * d`` (q8_0), ``d * sc * q - dmin * m`` (q2_K's 2-bit quants with 4-bit scales and
mins; q4_K and q5_K's 4/5-bit quants with 6-bit scales and mins), ``d * (sc - 32) * (q - 4 * !hbit)`` (q3_K),
``d * sc * (q - 32)`` (q6_K's 4+2-bit quants, int8 scales).
"""

from __future__ import annotations

import triton
import triton.language as tl

# name -> (format id in the kernels, block elements, block bytes)
FORMATS = {"q4_0": (0, 32, 18), "q8_0": (1, 32, 34), "q4k": (2, 256, 144), "q5k": (3, 256, 176),
           "q6k": (4, 256, 210), "q2k": (5, 256, 84), "q3k": (6, 256, 110)}


@triton.jit
def _fp16_at(ptr, mask):
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def dequant_tile(rows, kk, wm, FMT: tl.constexpr):
    """fp32 weights [BLOCK_N, BLOCK_K] of GGML format `FMT` (`FORMATS`) at columns `kk` (zeros where not `wm`)."""
    if FMT == 0:  # q4_0: fp16 d, 16 bytes of nibbles (low: elements 0-15, high: 16-31)
        b = kk // 32
        j = kk % 32
        base = rows + (b * 18)[None, :]
        d = _fp16_at(base, wm)
        byte = tl.load(base + (2 + j % 16)[None, :], mask=wm, other=0).to(tl.int32)
        q = (byte >> ((j // 16) * 4)[None, :]) & 0xF
        w = (q - 8).to(tl.float32) * d
    elif FMT == 1:  # q8_0: fp16 d, 32 int8
        b = kk // 32
        j = kk % 32
        base = rows + (b * 34)[None, :]
        d = _fp16_at(base, wm)
        q = tl.load(base + (2 + j)[None, :], mask=wm, other=0).to(tl.int8, bitcast=True)
        w = q.to(tl.float32) * d
    elif FMT == 4:  # q6_K: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d
        b = kk // 256
        e = kk % 256
        half = e // 128
        grp = (e % 128) // 32  # four groups of 32 per half
        lane = e % 32
        base = rows + (b * 210)[None, :]
        d = _fp16_at(base + 208, wm)
        lo = tl.load(base + (half * 64 + (grp % 2) * 32 + lane)[None, :], mask=wm, other=0).to(tl.int32)
        hi = tl.load(base + (128 + half * 32 + lane)[None, :], mask=wm, other=0).to(tl.int32)
        q = ((lo >> ((grp // 2) * 4)[None, :]) & 0xF) | (((hi >> (2 * grp)[None, :]) & 3) << 4)
        sc = tl.load(base + (192 + half * 8 + grp * 2 + lane // 16)[None, :], mask=wm,
                     other=0).to(tl.int8, bitcast=True)
        w = (d * sc.to(tl.float32)) * (q - 32).to(tl.float32)
    elif FMT == 5:  # q2_K: 16 scale/min bytes (low nibble scale, high min), 64 bytes of 2-bit quants, d, dmin
        b = kk // 256
        e = kk % 256
        base = rows + (b * 84)[None, :]
        d = _fp16_at(base + 80, wm)
        dmin = _fp16_at(base + 82, wm)
        s = tl.load(base + (e // 16)[None, :], mask=wm, other=0).to(tl.int32)
        # element 128h + 32j + l: bits 2j..2j+1 of quant byte 32h + l
        byte = tl.load(base + (16 + (e // 128) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
        q = (byte >> (2 * ((e % 128) // 32))[None, :]) & 3
        w = (d * (s & 0xF).to(tl.float32)) * q.to(tl.float32) - dmin * (s >> 4).to(tl.float32)
    elif FMT == 6:  # q3_K: 32 bytes of high bits, 64 of 2-bit quants, 12 of 6-bit scales, fp16 d
        b = kk // 256
        e = kk % 256
        j = e // 16  # sub-block of 16
        base = rows + (b * 110)[None, :]
        d = _fp16_at(base + 108, wm)
        s_lo = tl.load(base + (96 + j % 8)[None, :], mask=wm, other=0).to(tl.int32)
        s_hi = tl.load(base + (104 + j % 4)[None, :], mask=wm, other=0).to(tl.int32)
        low = tl.where((j < 8)[None, :], s_lo & 0xF, s_lo >> 4)
        sc = (low | (((s_hi >> (2 * (j // 4))[None, :]) & 3) << 4)) - 32
        byte = tl.load(base + (32 + (e // 128) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
        q = (byte >> (2 * ((e % 128) // 32))[None, :]) & 3
        hm = tl.load(base + (e % 32)[None, :], mask=wm, other=0).to(tl.int32)
        q -= 4 * (1 - ((hm >> (e // 32)[None, :]) & 1))  # bit e / 32 of hmask[e % 32] unset: minus 4
        w = (d * sc.to(tl.float32)) * q.to(tl.float32)
    else:  # q4_K / q5_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, (q5_K: 32 bytes of fifth bits,)
        # 128 bytes of nibbles
        b = kk // 256
        e = kk % 256
        sub = e // 32
        base = rows + (b * (144 if FMT == 2 else 176))[None, :]
        d = _fp16_at(base, wm)
        dmin = _fp16_at(base + 2, wm)
        lowsub = (sub < 4)[None, :]
        s_a = tl.load(base + (4 + sub)[None, :], mask=wm, other=0).to(tl.int32)  # s[j]
        s_b = tl.load(base + (4 + (sub + 4) % 12)[None, :], mask=wm, other=0).to(tl.int32)  # s[j + 4]
        s_c = tl.load(base + (4 + (sub + 8) % 12)[None, :], mask=wm, other=0).to(tl.int32)  # s[j - 4]
        sc = tl.where(lowsub, s_a & 63, (s_b & 0xF) | ((s_c >> 6) << 4))
        mn = tl.where(lowsub, s_b & 63, (s_b >> 4) | ((s_a >> 6) << 4))
        qs = 16 if FMT == 2 else 48
        byte = tl.load(base + (qs + (sub // 2) * 32 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
        q = (byte >> ((sub % 2) * 4)[None, :]) & 0xF
        if FMT == 3:
            high = tl.load(base + (16 + e % 32)[None, :], mask=wm, other=0).to(tl.int32)
            q += ((high >> sub[None, :]) & 1) * 16
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    return tl.where(wm, w, 0.0)
