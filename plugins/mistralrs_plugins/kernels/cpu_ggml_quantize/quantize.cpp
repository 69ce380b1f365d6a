// GGML block quantization (llama.cpp's q4_0 q4_1 q5_0 q5_1 q8_0 q8_1 q2_K q3_K q4_K q5_K q6_K q8_K) on the CPU.
//
//   quantize(w[rows, cols] fp32/bf16/fp16, any strides, qtype, nthreads) -> uint8 [rows, cols / block * bytes]
//
// The arithmetic is llama.cpp's reference C quantizers' (quantize_row_*_ref and the searches they call,
// make_qkx2_quants, make_q3_quants, make_qx_quants with rmse_type 1, in ggml-quants.c) operation for
// operation in float32: every product is rounded before it is added, every sum runs over a block's elements
// in order from 0, nearest_int is the same bit trick, fp16 scales are rounded (to nearest even) before they
// are used, and a search step wins only when strictly better. The build passes -ffp-contract=off and no
// -ffast-math, so the compiler neither fuses nor reorders anything: the bytes are llama.cpp's whatever the CPU,
// the ISA clone or the thread count, and those of the torch port (mistralrs_plugins.quant.ggml.formats) except
// where that port is not C's: signed zeros in q4_1/q5_1's min and max (C keeps the first of equal values, so
// m may be -0.0) and q3_K/q6_K super-blocks with values beyond ~1e17, whose cubed sums overflow to a NaN
// scale that C's `>` skips and torch's argmax picks.
//
// The k-quant searches run lane-parallel: one lane per sub-block (kGroup super-blocks of 8 sub-blocks of 32,
// or of 16 of 16), GCC vector types of 8 floats, each lane computing exactly its sub-block's scalar sequence
// (its own sequential sums; a "branch" is a per-lane select of the values the C code would have kept). Lanes
// never mix, so the result is the scalar result; vectors only run independent sub-blocks side by side, which
// also hides the latency of the sequential sums. On x86-64 the hot functions are cloned for AVX2 (chosen at
// load time; the default clone is plain SSE2, so the library runs on any x86-64; -DMISTRALRS_NO_CLONES builds
// that one alone), elsewhere the compiler maps the vectors to what the target has (NEON on aarch64).
//
// Where C's behaviour is undefined, x86-64's is taken (as the torch port does): a float -> int8 cast is
// cvttss2si's int32 (0x80000000 for NaN and out-of-range values) truncated to its low byte. NaN inputs are
// not matched (q8_0/q8_1 take the block's max in a tree, C's MAX keeps or drops a NaN by its position).
//
// Rows are converted to fp32 in segments of whole blocks (at most kSegment values) into a per-thread buffer;
// threads (OpenMP, the count the caller passes: torch.get_num_threads()) take row groups of ~64 Ki values
// dynamically, so a busy core slows the call down by its share only. Each block depends on its own values
// only, so the bytes do not depend on the thread count or the schedule.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"  // vectors of 32 bytes stay inside always-inlined functions

namespace {

#define AI inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MISTRALRS_NO_CLONES)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

constexpr float kGroupMaxEps = 1e-15f;  // GROUP_MAX_EPS
constexpr int64_t kSegment = 8192;      // values converted to fp32 at a time (a multiple of 256)
constexpr int64_t kItemValues = 1 << 16;  // values per unit of work handed to a thread
constexpr int kGroup = 2;                 // k-quant super-blocks searched side by side (1 and 4: slower)

enum QType : int64_t { kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kQ8_1, kQ2_K, kQ3_K, kQ4_K, kQ5_K, kQ6_K, kQ8_K, kNumTypes };

struct Format {
  int64_t block;  // values per block
  int64_t bytes;  // bytes per block
};
constexpr Format kFormats[kNumTypes] = {
    {32, 18}, {32, 20}, {32, 22}, {32, 24}, {32, 34}, {32, 36},
    {256, 84}, {256, 110}, {256, 144}, {256, 176}, {256, 210}, {256, 292},
};

// ------------------------------------------------------------------------------------------ scalar helpers

AI int nearest_int(float f) {
  const float v = f + 12582912.f;
  int32_t i;
  std::memcpy(&i, &v, sizeof i);
  return (i & 0x007fffff) - 0x00400000;
}

// C's float -> int conversion as x86-64 does it (cvttss2si): truncation, 0x80000000 for NaN/out of range.
AI int32_t c_int(float v) { return std::fabs(v) < 2147483648.0f ? static_cast<int32_t>(v) : INT32_MIN; }
// C's (int8_t)/(uint8_t) of a float on x86-64: the low byte of c_int.
AI int32_t c_int8(float v) { return static_cast<int8_t>(static_cast<uint8_t>(c_int(v) & 0xFF)); }
AI int32_t c_uint8(float v) { return c_int(v) & 0xFF; }

AI uint16_t fp16_bits(float f) { return c10::Half(f).x; }
AI float fp16_round(float f) { return static_cast<float>(c10::Half(f)); }
AI float fp16_value(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

AI void put_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

// ------------------------------------------------------------------------------------------ 32-value blocks

// quantize_row_q4_0_ref: d = max / -8 (max: the first value of largest magnitude), q = MIN(15, (int8)(x*id + 8.5)).
AI void block_q4_0(const float* x, uint8_t* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    const float v = x[j];
    if (amax < std::fabs(v)) { amax = std::fabs(v); max = v; }
  }
  const float d = max / -8;
  const float id = d ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  for (int j = 0; j < 16; ++j) {
    const int32_t q0 = std::min(15, c_int8(x[j] * id + 8.5f)) & 0xFF;
    const int32_t q1 = std::min(15, c_int8(x[j + 16] * id + 8.5f)) & 0xFF;
    y[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

AI void min_max(const float* x, float& mn, float& mx) {
  mn = FLT_MAX;
  mx = -FLT_MAX;
  for (int j = 0; j < 32; ++j) {
    const float v = x[j];
    if (v < mn) mn = v;
    if (v > mx) mx = v;
  }
}

// quantize_row_q4_1_ref: d = (max - min) / 15, m = min, q = MIN(15, (int8)((x - min)*id + 0.5)).
AI void block_q4_1(const float* x, uint8_t* y) {
  float mn, mx;
  min_max(x, mn, mx);
  const float d = (mx - mn) / 15;
  const float id = d ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  put_u16(y + 2, fp16_bits(mn));
  for (int j = 0; j < 16; ++j) {
    const int32_t q0 = std::min(15, c_int8((x[j] - mn) * id + 0.5f)) & 0xFF;
    const int32_t q1 = std::min(15, c_int8((x[j + 16] - mn) * id + 0.5f)) & 0xFF;
    y[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

// quantize_row_q5_0_ref: d = max / -16, q = MIN(31, (int8)(x*id + 16.5)); bit 4 of q[j] is bit j of qh.
AI void block_q5_0(const float* x, uint8_t* y) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < 32; ++j) {
    const float v = x[j];
    if (amax < std::fabs(v)) { amax = std::fabs(v); max = v; }
  }
  const float d = max / -16;
  const float id = d ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint32_t q0 = static_cast<uint32_t>(std::min(31, c_int8(x[j] * id + 16.5f))) & 0xFF;
    const uint32_t q1 = static_cast<uint32_t>(std::min(31, c_int8(x[j + 16] * id + 16.5f))) & 0xFF;
    y[6 + j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
    qh |= ((q0 & 0x10u) >> 4) << j;
    qh |= ((q1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(y + 2, &qh, 4);
}

// quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = (uint8)((x - min)*id + 0.5) (no clamp in C).
AI void block_q5_1(const float* x, uint8_t* y) {
  float mn, mx;
  min_max(x, mn, mx);
  const float d = (mx - mn) / 31;
  const float id = d ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  put_u16(y + 2, fp16_bits(mn));
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint32_t q0 = static_cast<uint32_t>(c_uint8((x[j] - mn) * id + 0.5f));
    const uint32_t q1 = static_cast<uint32_t>(c_uint8((x[j + 16] - mn) * id + 0.5f));
    y[8 + j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
    qh |= ((q0 & 0x10u) >> 4) << j;
    qh |= ((q1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(y + 4, &qh, 4);
}

// ------------------------------------------------------------------------------------------ lanes

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int kLanes = 8;

AI vf splat(float v) { return vf{v, v, v, v, v, v, v, v}; }
AI vi splati(int32_t v) { return vi{v, v, v, v, v, v, v, v}; }
AI vi vnearest(vf f) { return (((vi)(f + 12582912.f)) & 0x007fffff) - 0x00400000; }
AI vi vclamp(vi l, int32_t lo, int32_t hi) {
  l = l < splati(lo) ? splati(lo) : l;
  return l > splati(hi) ? splati(hi) : l;
}
AI vf vfloat(vi l) { return __builtin_convertvector(l, vf); }
AI vf vabs(vf v) { return (vf)(((vi)v) & 0x7fffffff); }
AI vf vsel(vi m, vf a, vf b) { return m ? a : b; }

// c_int, c_int8 and c_roundf per lane.
AI vi vc_int(vf v) {
  const vi ok = vabs(v) < splat(2147483648.0f);
  return ok ? __builtin_convertvector(vsel(ok, v, splat(0.0f)), vi) : splati(INT32_MIN);
}
AI vi vc_int8(vf v) { return ((vc_int(v) & 0xFF) ^ 0x80) - 0x80; }
AI vf vc_roundf(vf v) {
  const vf a = vabs(v);
  const vi small = a < splat(8388608.0f);
  const vf ai = vsel(small, a, splat(0.0f));
  vf t = vfloat(__builtin_convertvector(ai, vi));
  t += vsel(ai - t >= splat(0.5f), splat(1.0f), splat(0.0f));
  return vsel(small, (vf)(((vi)t) | (((vi)v) & splati(INT32_MIN))), v);
}

// quantize_row_q8_0_ref / q8_1_ref: d = amax / 127, q = roundf(x*id); q8_1 also s = sum(q) * d.
// Eight values at a time: the max is exact in any order (NaN aside), everything else is per value.
template <bool kQ81>
AI void block_q8(const float* x, uint8_t* y) {
  vf v[4];
  std::memcpy(v, x, sizeof v);
  vf m = vabs(v[0]);
  for (int k = 1; k < 4; ++k) {
    const vf a = vabs(v[k]);
    m = vsel(m > a, m, a);
  }
  float amax = 0.0f;
  for (int b = 0; b < kLanes; ++b) amax = amax > m[b] ? amax : m[b];  // MAX(amax, fabsf(v))
  const float d = amax / 127;
  const float id = d ? 1.0f / d : 0.0f;
  put_u16(y, fp16_bits(d));
  uint8_t* qs = y + (kQ81 ? 4 : 2);
  vi sum = splati(0);
  for (int k = 0; k < 4; ++k) {
    const vi q = vc_int8(vc_roundf(v[k] * id));
    sum += q;
    for (int b = 0; b < kLanes; ++b) qs[8 * k + b] = static_cast<uint8_t>(q[b]);
  }
  if (kQ81) {
    int s = 0;
    for (int b = 0; b < kLanes; ++b) s += sum[b];
    put_u16(y + 2, fp16_bits(static_cast<float>(s) * d));
  }
}

// xt[i * NV + v]: value i of the sub-blocks in lanes of vector v (sub-block v * 8 + lane).
template <int N, int NV>
AI void transpose_in(const float* x, vf* xt) {
  for (int v = 0; v < NV; ++v)
    for (int b = 0; b < kLanes; ++b)
      for (int i = 0; i < N; ++i) xt[i * NV + v][b] = x[(v * kLanes + b) * N + i];
}

// make_qkx2_quants(N, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad) for NV * 8 sub-blocks,
// one per lane. L: uint8 in sub-block order ([(v * 8 + lane) * N + i]); scale and the_min per sub-block.
template <int N, int NV, int nmax>
AI void qkx2_lanes(const vf* xt, const vf* wt, float rmin, float rdelta, int nstep, bool use_mad, uint8_t* L,
                   float* scales, float* the_mins) {
  const vf zero = splat(0.0f);
  const vf fnmax = splat(static_cast<float>(nmax));
  vf mn[NV], mx[NV], sum_w[NV], sum_x[NV];
  for (int v = 0; v < NV; ++v) {
    mn[v] = mx[v] = xt[v];
    sum_w[v] = wt[v];
    sum_x[v] = sum_w[v] * xt[v];
  }
  for (int i = 1; i < N; ++i)
    for (int v = 0; v < NV; ++v) {
      const vf x = xt[i * NV + v], w = wt[i * NV + v];
      mn[v] = vsel(x < mn[v], x, mn[v]);
      mx[v] = vsel(x > mx[v], x, mx[v]);
      sum_w[v] += w;
      sum_x[v] += w * x;
    }
  vi flat[NV];
  vf flat_min[NV], scale[NV], best[NV], l_isc[NV], l_min[NV];
  for (int v = 0; v < NV; ++v) {
    mn[v] = vsel(mn[v] > zero, zero, mn[v]);
    flat[v] = mx[v] == mn[v];
    flat_min[v] = mn[v];
    const vf iscale = fnmax / (mx[v] - mn[v]);
    scale[v] = 1.0f / iscale;
    l_isc[v] = iscale;
    l_min[v] = mn[v];
    best[v] = zero;
  }
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < NV; ++v) {
      const vf x = xt[i * NV + v];
      const vf l = vfloat(vclamp(vnearest(l_isc[v] * (x - mn[v])), 0, nmax));
      vf diff = scale[v] * l + mn[v] - x;
      diff = use_mad ? vabs(diff) : diff * diff;
      best[v] += wt[i * NV + v] * diff;
    }
  vf laux[N * NV];
  for (int is = 0; is <= nstep; ++is) {
    const float c = (rmin + rdelta * static_cast<float>(is)) + static_cast<float>(nmax);
    vf isc[NV], sl[NV], sl2[NV], sxl[NV];
    for (int v = 0; v < NV; ++v) {
      isc[v] = splat(c) / (mx[v] - mn[v]);
      sl[v] = sl2[v] = sxl[v] = zero;
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < NV; ++v) {
        const vf x = xt[i * NV + v];
        const vf l = vfloat(vclamp(vnearest(isc[v] * (x - mn[v])), 0, nmax));
        laux[i * NV + v] = l;
        const vf wl = wt[i * NV + v] * l;
        sl[v] += wl;
        sl2[v] += wl * l;
        sxl[v] += wl * x;
      }
    vf D[NV], ts[NV], tm[NV], cur[NV];
    for (int v = 0; v < NV; ++v) {
      D[v] = sum_w[v] * sl2[v] - sl[v] * sl[v];
      ts[v] = (sum_w[v] * sxl[v] - sum_x[v] * sl[v]) / D[v];
      tm[v] = (sl2[v] * sum_x[v] - sl[v] * sxl[v]) / D[v];
      const vi clip = tm[v] > zero;
      tm[v] = vsel(clip, zero, tm[v]);
      ts[v] = vsel(clip, sxl[v] / sl2[v], ts[v]);
      cur[v] = zero;
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < NV; ++v) {
        vf diff = ts[v] * laux[i * NV + v] + tm[v] - xt[i * NV + v];
        diff = use_mad ? vabs(diff) : diff * diff;
        cur[v] += wt[i * NV + v] * diff;
      }
    for (int v = 0; v < NV; ++v) {
      const vi win = (D[v] > zero) & (cur[v] < best[v]);
      best[v] = vsel(win, cur[v], best[v]);
      scale[v] = vsel(win, ts[v], scale[v]);
      l_isc[v] = vsel(win, isc[v], l_isc[v]);
      l_min[v] = vsel(win, mn[v], l_min[v]);
      mn[v] = vsel(win, tm[v], mn[v]);
    }
  }
  // The winner's L again, from the iscale and min it was quantized with (the same arithmetic).
  for (int v = 0; v < NV; ++v) {
    scale[v] = vsel(flat[v], zero, scale[v]);
    mn[v] = vsel(flat[v], flat_min[v], mn[v]);
    for (int b = 0; b < kLanes; ++b) {
      scales[v * kLanes + b] = scale[v][b];
      the_mins[v * kLanes + b] = -mn[v][b];
    }
    for (int i = 0; i < N; ++i) {
      vi l = vclamp(vnearest(l_isc[v] * (xt[i * NV + v] - l_min[v])), 0, nmax);
      l = flat[v] ? splati(0) : l;
      for (int b = 0; b < kLanes; ++b) L[(v * kLanes + b) * N + i] = static_cast<uint8_t>(l[b]);
    }
  }
}

// The first value of largest magnitude per lane (+0 when all are 0): amax and max of the C loops.
template <int N, int NV>
AI void first_absmax(const vf* xt, vf* amax, vf* max) {
  for (int v = 0; v < NV; ++v) amax[v] = max[v] = splat(0.0f);
  for (int i = 0; i < N; ++i)
    for (int v = 0; v < NV; ++v) {
      const vf ax = vabs(xt[i * NV + v]);
      const vi upd = ax > amax[v];
      amax[v] = vsel(upd, ax, amax[v]);
      max[v] = vsel(upd, xt[i * NV + v], max[v]);
    }
}

// make_qx_quants(N, nmax, x, L, rmse_type = 1, NULL) per lane. L: int8 in [0, 2 nmax), sub-block order.
template <int N, int NV, int nmax>
AI void qx_rmse1_lanes(const vf* xt, int8_t* L, float* scales) {
  const vf zero = splat(0.0f);
  vf amax[NV], max[NV];
  first_absmax<N, NV>(xt, amax, max);
  vf w[N * NV], wx[N * NV];
  for (int k = 0; k < N * NV; ++k) {
    w[k] = xt[k] * xt[k];
    wx[k] = w[k] * xt[k];
  }
  vf scale[NV], best[NV], l_isc[NV];
  for (int s = 0; s < 19; ++s) {  // s = 0: iscale = -nmax / max; then is = -9..9 without 0
    const int is = s == 0 ? 0 : (s <= 9 ? s - 10 : s - 9);
    const float c = s == 0 ? static_cast<float>(-nmax)
                           : -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is));
    vf isc[NV], slx[NV], sl2[NV];
    for (int v = 0; v < NV; ++v) {
      isc[v] = splat(c) / max[v];
      slx[v] = sl2[v] = zero;
    }
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < NV; ++v) {
        const vf l = vfloat(vclamp(vnearest(isc[v] * xt[i * NV + v]), -nmax, nmax - 1));
        slx[v] += wx[i * NV + v] * l;
        sl2[v] += w[i * NV + v] * l * l;
      }
    for (int v = 0; v < NV; ++v) {
      if (s == 0) {
        scale[v] = vsel(sl2[v] != zero, slx[v] / sl2[v], zero);
        best[v] = scale[v] * slx[v];
        l_isc[v] = isc[v];
      } else {
        const vi take = (sl2[v] > zero) & (slx[v] * slx[v] > best[v] * sl2[v]);
        const vf ns = slx[v] / sl2[v];
        scale[v] = vsel(take, ns, scale[v]);
        best[v] = vsel(take, ns * slx[v], best[v]);
        l_isc[v] = vsel(take, isc[v], l_isc[v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const vi empty = amax[v] < splat(kGroupMaxEps);
    scale[v] = vsel(empty, zero, scale[v]);
    for (int b = 0; b < kLanes; ++b) scales[v * kLanes + b] = scale[v][b];
    for (int i = 0; i < N; ++i) {
      vi l = vclamp(vnearest(l_isc[v] * xt[i * NV + v]), -nmax, nmax - 1) + nmax;
      l = empty ? splati(0) : l;
      for (int b = 0; b < kLanes; ++b) L[(v * kLanes + b) * N + i] = static_cast<int8_t>(l[b]);
    }
  }
}

// make_q3_quants(N, nmax, x, L, do_rmse = true) per lane. L: int8 in [0, 2 nmax), sub-block order.
// A pass that changes nothing in a lane leaves it as it was, so passes run until no lane changes (at most 5),
// as each lane's C loop would.
template <int N, int NV, int nmax>
AI void q3_rmse_lanes(const vf* xt, int8_t* L, float* scales) {
  const vf zero = splat(0.0f);
  vf amax[NV], max[NV];
  first_absmax<N, NV>(xt, amax, max);
  vf w[N * NV], wx[N * NV];
  for (int k = 0; k < N * NV; ++k) {
    w[k] = xt[k] * xt[k];
    wx[k] = w[k] * xt[k];
  }
  vi Li[N * NV];
  vf sumlx[NV], suml2[NV];
  for (int v = 0; v < NV; ++v) {
    const vf iscale = splat(static_cast<float>(-nmax)) / max[v];
    sumlx[v] = suml2[v] = zero;
    for (int i = 0; i < N; ++i) {
      const vi l = vclamp(vnearest(iscale * xt[i * NV + v]), -nmax, nmax - 1);
      Li[i * NV + v] = l;
      const vf lf = vfloat(l);
      sumlx[v] += wx[i * NV + v] * lf;
      suml2[v] += w[i * NV + v] * lf * lf;
    }
  }
  for (int itry = 0; itry < 5; ++itry) {
    vi changed = splati(0);
    for (int i = 0; i < N; ++i)
      for (int v = 0; v < NV; ++v) {
        const int k = i * NV + v;
        const vf li = vfloat(Li[k]);
        vf slx = sumlx[v] - wx[k] * li;
        vf sl2 = suml2[v] - w[k] * li * li;
        const vi new_l = vclamp(vnearest(xt[k] * sl2 / slx), -nmax, nmax - 1);
        const vf nl = vfloat(new_l);
        const vi go = (slx > zero) & (new_l != Li[k]);
        slx += wx[k] * nl;
        sl2 += w[k] * nl * nl;
        const vi upd = go & (sl2 > zero) & (slx * slx * suml2[v] > sumlx[v] * sumlx[v] * sl2);
        Li[k] = upd ? new_l : Li[k];
        sumlx[v] = vsel(upd, slx, sumlx[v]);
        suml2[v] = vsel(upd, sl2, suml2[v]);
        changed |= upd;
      }
    bool any = false;
    for (int b = 0; b < kLanes; ++b) any |= changed[b] != 0;
    if (!any) break;
  }
  for (int v = 0; v < NV; ++v) {
    const vi empty = amax[v] < splat(kGroupMaxEps);
    const vf scale = vsel(empty, zero, vsel(suml2[v] > zero, sumlx[v] / suml2[v], zero));
    for (int b = 0; b < kLanes; ++b) scales[v * kLanes + b] = scale[b];
    for (int i = 0; i < N; ++i) {
      const vi l = empty ? splati(0) : Li[i * NV + v] + nmax;
      for (int b = 0; b < kLanes; ++b) L[(v * kLanes + b) * N + i] = static_cast<int8_t>(l[b]);
    }
  }
}

// ------------------------------------------------------------------------------------------ k-quants

// quantize_row_q2_K_ref for one super-block after the sub-block searches: scales[16], qs[64], d, dmin.
AI void finish_q2_K(const float* x, uint8_t* L, const float* scales, const float* mins, uint8_t* y) {
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 16; ++j) {
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  uint8_t* sc = y;
  uint16_t d16, m16;
  if (max_scale > 0) {
    const float iscale = 15.f / max_scale;
    for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
    d16 = fp16_bits(max_scale / 15.f);
  } else {
    for (int j = 0; j < 16; ++j) sc[j] = 0;
    d16 = fp16_bits(0.f);
  }
  if (max_min > 0) {
    const float iscale = 15.f / max_min;
    for (int j = 0; j < 16; ++j) sc[j] |= static_cast<uint8_t>(static_cast<uint32_t>(nearest_int(iscale * mins[j])) << 4);
    m16 = fp16_bits(max_min / 15.f);
  } else {
    m16 = fp16_bits(0.f);
  }
  const float dd = fp16_value(d16), dmin = fp16_value(m16);
  for (int j = 0; j < 16; ++j) {
    const float d = dd * static_cast<float>(sc[j] & 0xF);
    if (!d) continue;
    const float dm = dmin * static_cast<float>(sc[j] >> 4);
    for (int ii = 0; ii < 16; ++ii) {
      const int l = nearest_int((x[16 * j + ii] + dm) / d);
      L[16 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(3, l)));
    }
  }
  uint8_t* qs = y + 16;
  for (int j = 0; j < 256; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
  put_u16(y + 80, d16);
  put_u16(y + 82, m16);
}

// quantize_row_q2_K_ref for NSB super-blocks (their 16 * NSB sub-blocks searched side by side).
template <int NSB>
AI void superblocks_q2_K(const float* x, uint8_t* y) {
  vf xt[16 * 2 * NSB], wt[16 * 2 * NSB];
  transpose_in<16, 2 * NSB>(x, xt);
  for (int k = 0; k < 32 * NSB; ++k) wt[k] = vabs(xt[k]);
  uint8_t L[256 * NSB];
  float scales[16 * NSB], mins[16 * NSB];
  qkx2_lanes<16, 2 * NSB, 3>(xt, wt, -0.5f, 0.1f, 15, true, L, scales, mins);
  for (int s = 0; s < NSB; ++s) finish_q2_K(x + 256 * s, L + 256 * s, scales + 16 * s, mins + 16 * s, y + 84 * s);
}

// quantize_row_q3_K_ref for one super-block after the sub-block searches: hmask[32], qs[64], scales[12], d.
AI void finish_q3_K(const float* x, int8_t* L, const float* scales, uint8_t* y) {
  float max_scale = 0, amax = 0;
  for (int j = 0; j < 16; ++j) {
    const float s = std::fabs(scales[j]);
    if (s > amax) { amax = s; max_scale = scales[j]; }
  }
  uint8_t* sc = y + 96;
  std::memset(sc, 0, 12);
  uint16_t d16;
  if (max_scale) {
    const float iscale = -32.f / max_scale;
    for (int j = 0; j < 16; ++j) {
      int8_t l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
      l = static_cast<int8_t>(std::max<int>(-32, std::min<int>(31, l)) + 32);
      if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF);
      else sc[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
      l = static_cast<int8_t>(l >> 4);
      sc[j % 4 + 8] |= static_cast<uint8_t>(l << (2 * (j / 4)));
    }
    d16 = fp16_bits(1 / iscale);
  } else {
    d16 = fp16_bits(0.f);
  }
  const float dd = fp16_value(d16);
  for (int j = 0; j < 16; ++j) {
    int8_t s = static_cast<int8_t>(j < 8 ? sc[j] & 0xF : sc[j - 8] >> 4);
    s = static_cast<int8_t>((s | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
    const float d = dd * static_cast<float>(s);
    if (!d) continue;
    for (int ii = 0; ii < 16; ++ii) {
      const int l = nearest_int(x[16 * j + ii] / d);
      L[16 * j + ii] = static_cast<int8_t>(std::max(-4, std::min(3, l)) + 4);
    }
  }
  uint8_t* hmask = y;
  std::memset(hmask, 0, 32);
  int m = 0;
  uint8_t hm = 1;
  for (int j = 0; j < 256; ++j) {
    if (L[j] > 3) {
      hmask[m] |= hm;
      L[j] = static_cast<int8_t>(L[j] - 4);
    }
    if (++m == 32) {
      m = 0;
      hm = static_cast<uint8_t>(hm << 1);
    }
  }
  uint8_t* qs = y + 32;
  for (int j = 0; j < 256; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
  put_u16(y + 108, d16);
}

// quantize_row_q3_K_ref for NSB super-blocks (their 16 * NSB sub-blocks searched side by side).
template <int NSB>
AI void superblocks_q3_K(const float* x, uint8_t* y) {
  vf xt[16 * 2 * NSB];
  transpose_in<16, 2 * NSB>(x, xt);
  int8_t L[256 * NSB];
  float scales[16 * NSB];
  q3_rmse_lanes<16, 2 * NSB, 4>(xt, L, scales);
  for (int s = 0; s < NSB; ++s) finish_q3_K(x + 256 * s, L + 256 * s, scales + 16 * s, y + 110 * s);
}

// The shared part of quantize_row_q4_K_ref / q5_K_ref for NSB super-blocks (8 * NSB sub-blocks of 32, one per
// lane): L per value, the 12 packed scale bytes and d, dmin per super-block.
template <int NSB, int nmax>
AI void q45_K(const float* x, float rmin, int nstep, uint8_t* L, uint8_t* scales12, uint16_t* d16, uint16_t* m16) {
  vf xt[32 * NSB], wt[32 * NSB];
  transpose_in<32, NSB>(x, xt);
  for (int v = 0; v < NSB; ++v) {
    vf sum_x2 = splat(0.0f);
    for (int i = 0; i < 32; ++i) sum_x2 += xt[i * NSB + v] * xt[i * NSB + v];
    const vf q = sum_x2 / 32.0f;
    vf av_x;
    for (int b = 0; b < kLanes; ++b) av_x[b] = std::sqrt(q[b]);
    for (int i = 0; i < 32; ++i) wt[i * NSB + v] = av_x + vabs(xt[i * NSB + v]);
  }
  float scales[8 * NSB], mins[8 * NSB];
  qkx2_lanes<32, NSB, nmax>(xt, wt, rmin, 0.1f, nstep, false, L, scales, mins);
  for (int s = 0; s < NSB; ++s) {
    const float* sx = x + 256 * s;
    const float* ss = scales + 8 * s;
    const float* sm = mins + 8 * s;
    uint8_t* sL = L + 256 * s;
    uint8_t* y = scales12 + 12 * s;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      if (ss[j] > max_scale) max_scale = ss[j];
      if (sm[j] > max_min) max_min = sm[j];
    }
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
      ls[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_scale * ss[j])));
      lm[j] = std::min<uint8_t>(63, static_cast<uint8_t>(nearest_int(inv_min * sm[j])));
      if (j < 4) {
        y[j] = ls[j];
        y[j + 4] = lm[j];
      } else {
        y[j + 4] = static_cast<uint8_t>((ls[j] & 0xF) | ((lm[j] & 0xF) << 4));
        y[j - 4] |= static_cast<uint8_t>((ls[j] >> 4) << 6);
        y[j - 0] |= static_cast<uint8_t>((lm[j] >> 4) << 6);
      }
    }
    d16[s] = fp16_bits(max_scale / 63.f);
    m16[s] = fp16_bits(max_min / 63.f);
    const float dd = fp16_value(d16[s]), dmin = fp16_value(m16[s]);
    for (int j = 0; j < 8; ++j) {
      const float d = dd * static_cast<float>(ls[j]);  // get_scale_min_k4 gives back ls, lm
      if (!d) continue;
      const float dm = dmin * static_cast<float>(lm[j]);
      for (int ii = 0; ii < 32; ++ii) {
        const int l = nearest_int((sx[32 * j + ii] + dm) / d);
        sL[32 * j + ii] = static_cast<uint8_t>(std::max(0, std::min(nmax, l)));
      }
    }
  }
}

// quantize_row_q4_K_ref for NSB super-blocks: d, dmin, scales[12], qs[128].
template <int NSB>
AI void superblocks_q4_K(const float* x, uint8_t* y) {
  uint8_t L[256 * NSB], sc[12 * NSB];
  uint16_t d16[NSB], m16[NSB];
  q45_K<NSB, 15>(x, -1.f, 20, L, sc, d16, m16);
  for (int s = 0; s < NSB; ++s) {
    uint8_t* b = y + 144 * s;
    const uint8_t* sL = L + 256 * s;
    put_u16(b, d16[s]);
    put_u16(b + 2, m16[s]);
    std::memcpy(b + 4, sc + 12 * s, 12);
    uint8_t* q = b + 16;
    for (int j = 0; j < 256; j += 64) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(sL[j + l] | (sL[j + l + 32] << 4));
      q += 32;
    }
  }
}

// quantize_row_q5_K_ref for NSB super-blocks: d, dmin, scales[12], qh[32], qs[128].
template <int NSB>
AI void superblocks_q5_K(const float* x, uint8_t* y) {
  uint8_t L[256 * NSB], sc[12 * NSB];
  uint16_t d16[NSB], m16[NSB];
  q45_K<NSB, 31>(x, -0.5f, 15, L, sc, d16, m16);
  for (int s = 0; s < NSB; ++s) {
    uint8_t* b = y + 176 * s;
    const uint8_t* sL = L + 256 * s;
    put_u16(b, d16[s]);
    put_u16(b + 2, m16[s]);
    std::memcpy(b + 4, sc + 12 * s, 12);
    uint8_t* qh = b + 16;
    uint8_t* ql = b + 48;
    std::memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < 256; n += 64) {
      for (int j = 0; j < 32; ++j) {
        int l1 = sL[n + j];
        if (l1 > 15) { l1 -= 16; qh[j] |= m1; }
        int l2 = sL[n + j + 32];
        if (l2 > 15) { l2 -= 16; qh[j] |= m2; }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 = static_cast<uint8_t>(m1 << 2);
      m2 = static_cast<uint8_t>(m2 << 2);
      ql += 32;
    }
  }
}

// quantize_row_q6_K_ref for one super-block after the sub-block searches: ql[128], qh[64], scales[16] (int8), d.
AI void finish_q6_K(const float* x, int8_t* L, const float* scales, uint8_t* y) {
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    const float a = std::fabs(scales[ib]);
    if (a > max_abs_scale) { max_abs_scale = a; max_scale = scales[ib]; }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(y, 0, 210);
    put_u16(y + 208, fp16_bits(0.f));
    return;
  }
  const float iscale = -128.f / max_scale;
  const uint16_t d16 = fp16_bits(1 / iscale);
  int8_t* sc = reinterpret_cast<int8_t*>(y + 192);
  for (int ib = 0; ib < 16; ++ib) sc[ib] = static_cast<int8_t>(std::min(127, nearest_int(iscale * scales[ib])));
  const float dd = fp16_value(d16);
  for (int j = 0; j < 16; ++j) {
    const float d = dd * static_cast<float>(sc[j]);
    if (!d) continue;
    for (int ii = 0; ii < 16; ++ii) {
      const int l = nearest_int(x[16 * j + ii] / d);
      L[16 * j + ii] = static_cast<int8_t>(std::max(-32, std::min(31, l)) + 32);
    }
  }
  uint8_t* ql = y;
  uint8_t* qh = y + 128;
  for (int j = 0; j < 256; j += 128) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t q1 = L[j + l + 0] & 0xF;
      const uint8_t q2 = L[j + l + 32] & 0xF;
      const uint8_t q3 = L[j + l + 64] & 0xF;
      const uint8_t q4 = L[j + l + 96] & 0xF;
      ql[l + 0] = static_cast<uint8_t>(q1 | (q3 << 4));
      ql[l + 32] = static_cast<uint8_t>(q2 | (q4 << 4));
      qh[l] = static_cast<uint8_t>((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4) |
                                   ((L[j + l + 96] >> 4) << 6));
    }
    ql += 64;
    qh += 32;
  }
  put_u16(y + 208, d16);
}

// quantize_row_q6_K_ref for NSB super-blocks (their 16 * NSB sub-blocks searched side by side).
template <int NSB>
AI void superblocks_q6_K(const float* x, uint8_t* y) {
  vf xt[16 * 2 * NSB];
  transpose_in<16, 2 * NSB>(x, xt);
  int8_t L[256 * NSB];
  float scales[16 * NSB];
  qx_rmse1_lanes<16, 2 * NSB, 32>(xt, L, scales);
  for (int s = 0; s < NSB; ++s) finish_q6_K(x + 256 * s, L + 256 * s, scales + 16 * s, y + 210 * s);
}

// quantize_row_q8_K_ref for one super-block: float d, qs[256] (int8), bsums[16] (int16). An all-zero block is
// all zero bytes (C leaves its bsums unset; the torch port writes zeros).
AI void superblock_q8_K(const float* x, uint8_t* y) {
  float max = 0, amax = 0;
  for (int j = 0; j < 256; ++j) {
    const float ax = std::fabs(x[j]);
    if (ax > amax) { amax = ax; max = x[j]; }
  }
  if (!amax) {
    std::memset(y, 0, 292);
    return;
  }
  const float iscale = -127.f / max;
  int8_t* qs = reinterpret_cast<int8_t*>(y + 4);
  for (int j = 0; j < 256; ++j) qs[j] = static_cast<int8_t>(std::min(127, nearest_int(iscale * x[j])));
  for (int j = 0; j < 16; ++j) {
    int sum = 0;
    for (int ii = 0; ii < 16; ++ii) sum += qs[j * 16 + ii];
    const int16_t s = static_cast<int16_t>(sum);
    std::memcpy(y + 260 + 2 * j, &s, 2);
  }
  const float d = 1 / iscale;
  std::memcpy(y, &d, 4);
}

// ------------------------------------------------------------------------------------------ rows

// One function per type (cloned per ISA on x86-64): nb blocks of x -> nb blocks of y.
CLONES void run_q4_0(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q4_0(x + 32 * i, y + 18 * i); }
CLONES void run_q4_1(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q4_1(x + 32 * i, y + 20 * i); }
CLONES void run_q5_0(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q5_0(x + 32 * i, y + 22 * i); }
CLONES void run_q5_1(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q5_1(x + 32 * i, y + 24 * i); }
CLONES void run_q8_0(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q8<false>(x + 32 * i, y + 34 * i); }
CLONES void run_q8_1(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) block_q8<true>(x + 32 * i, y + 36 * i); }
// k-quants: kGroup super-blocks at a time (more independent lanes to hide the latency of the sequential sums).
#define RUN_K(fn, bytes)                                                              \
  int64_t i = 0;                                                                      \
  for (; i + kGroup <= nb; i += kGroup) fn<kGroup>(x + 256 * i, y + (bytes) * i);   \
  for (; i < nb; ++i) fn<1>(x + 256 * i, y + (bytes) * i);
CLONES void run_q2_K(const float* x, uint8_t* y, int64_t nb) { RUN_K(superblocks_q2_K, 84) }
CLONES void run_q3_K(const float* x, uint8_t* y, int64_t nb) { RUN_K(superblocks_q3_K, 110) }
CLONES void run_q4_K(const float* x, uint8_t* y, int64_t nb) { RUN_K(superblocks_q4_K, 144) }
CLONES void run_q5_K(const float* x, uint8_t* y, int64_t nb) { RUN_K(superblocks_q5_K, 176) }
CLONES void run_q6_K(const float* x, uint8_t* y, int64_t nb) { RUN_K(superblocks_q6_K, 210) }
CLONES void run_q8_K(const float* x, uint8_t* y, int64_t nb) { for (int64_t i = 0; i < nb; ++i) superblock_q8_K(x + 256 * i, y + 292 * i); }

using RunFn = void (*)(const float*, uint8_t*, int64_t);
RunFn runner(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return run_q4_0;
    case kQ4_1: return run_q4_1;
    case kQ5_0: return run_q5_0;
    case kQ5_1: return run_q5_1;
    case kQ8_0: return run_q8_0;
    case kQ8_1: return run_q8_1;
    case kQ2_K: return run_q2_K;
    case kQ3_K: return run_q3_K;
    case kQ4_K: return run_q4_K;
    case kQ5_K: return run_q5_K;
    case kQ6_K: return run_q6_K;
    default: return run_q8_K;
  }
}

// n values of a row (stride s between them) to fp32.
template <typename T>
void to_f32(const T* src, int64_t s, int64_t n, float* dst) {
  if (s == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i * s]);
  }
}

template <typename T>
void quantize_rows(const T* w, int64_t s0, int64_t s1, int64_t rows, int64_t cols, int64_t qtype, uint8_t* out,
                   int64_t nthreads) {
  const Format f = kFormats[qtype];
  const int64_t row_bytes = cols / f.block * f.bytes;
  const int64_t seg = std::min<int64_t>(cols, kSegment);  // a multiple of the block (kSegment is of 256)
  const int64_t rows_per_item = std::max<int64_t>(1, kItemValues / cols);
  const int64_t items = (rows + rows_per_item - 1) / rows_per_item;
  const RunFn run = runner(qtype);
  auto work = [&](int64_t item, float* buf) {
    const int64_t r1 = std::min(rows, (item + 1) * rows_per_item);
    for (int64_t r = item * rows_per_item; r < r1; ++r) {
      for (int64_t c0 = 0; c0 < cols; c0 += seg) {
        const int64_t n = std::min(seg, cols - c0);
        to_f32(w + r * s0 + c0 * s1, s1, n, buf);
        run(buf, out + r * row_bytes + c0 / f.block * f.bytes, n / f.block);
      }
    }
  };
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min(nthreads, items)));
  if (nt == 1) {
    std::vector<float> buf(seg);
    for (int64_t i = 0; i < items; ++i) work(i, buf.data());
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> buf(seg);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) work(i, buf.data());
  }
}

at::Tensor quantize(const at::Tensor& w, int64_t qtype, int64_t nthreads) {
  TORCH_CHECK(qtype >= 0 && qtype < kNumTypes, "ggml quantize: unknown type id ", qtype);
  TORCH_CHECK(w.dim() == 2 && w.device().is_cpu(), "ggml quantize: expected a CPU tensor [rows, cols]");
  const auto dtype = w.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "ggml quantize: expected float32, bfloat16 or float16, got ", dtype);
  const Format f = kFormats[qtype];
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(cols > 0 && cols % f.block == 0, "ggml quantize: cols must be a positive multiple of ", f.block);
  at::Tensor out = at::empty({rows, cols / f.block * f.bytes}, w.options().dtype(at::kByte));
  if (rows == 0) return out;
  uint8_t* y = out.data_ptr<uint8_t>();
  const int64_t s0 = w.stride(0), s1 = w.stride(1);
  // const_data_ptr: the weight is only read (it may be a read-only memory map).
  if (dtype == at::kFloat)
    quantize_rows(w.const_data_ptr<float>(), s0, s1, rows, cols, qtype, y, nthreads);
  else if (dtype == at::kBFloat16)
    quantize_rows(w.const_data_ptr<at::BFloat16>(), s0, s1, rows, cols, qtype, y, nthreads);
  else
    quantize_rows(w.const_data_ptr<at::Half>(), s0, s1, rows, cols, qtype, y, nthreads);
  return out;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("quantize(Tensor w, int qtype, int nthreads) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("quantize", &quantize);
}
