// Quantized matmul on AVX2 CPUs for llama.cpp's GGML block formats (q4_0, q8_0, q4_K, q5_K, q6_K).
//
//   y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias[N]),  x bf16/fp32, W the canonical block bytes
//
// As llama.cpp computes it: every row of x is first quantized to 8-bit blocks (q8_0 blocks of 32 for
// q4_0/q8_0 weights, q8_K blocks of 256 for the k-quants, exactly as quantize_row_q8_0_ref /
// quantize_row_q8_K_ref do), then each output is a sum over blocks of integer dot products (AVX2
// maddubs/madd, exact) scaled in fp32. The block layouts are llama.cpp's (ggml-common.h); the dot
// products follow the structure of its AVX2 ggml_vec_dot_*_q8_* (an fp32 lane accumulator per output,
// one fused multiply-add per block with the fp32 product of the two scales, a horizontal sum at the end),
// with one change for q4_0/q8_0: two rows of W share a 256-bit vector (4 lanes each), so each block's
// int-to-float conversion, scale product and fmadd serve two outputs.
//
// Batch invariance: every output element (m, n) is computed by one arithmetic sequence that depends on
// nothing but row m of x and row n of W: its lane accumulator gets one fmadd per block (32 elements for
// q4_0/q8_0, 256 for the k-quants) in block order, from the block's integer lanes (exact, so the order in
// which they are formed does not matter) and the fp32 product of the two scales; then one fixed
// horizontal-sum tree, then the bias. The register tiles below (MR rows of x against G rows of W) only
// share loads and weight unpacking between outputs and every vector operation is lane-wise per output,
// so a row's result is bit-identical alone, in any batch, at any tile position, on any number of threads.
// Nothing relies on the compiler's FP contraction (the build passes -ffp-contract=off; every fmadd is
// explicit).
//
// Schedules (N split into work items of whole 8-row groups, claimed dynamically by the kernels' thread pool
// with torch's thread count; little work runs on the calling thread):
// - M <= kGemvRows (decode): tiles of all M rows against 2-8 rows of W (more rows of W for fewer rows of x,
//   so that enough independent accumulator chains hide the fmadd latency), kGemvItemsPerThread items per
//   thread. The rows of a tile come from equal parts of the item, so each is one long sequential stream through W, which the
//   hardware prefetchers follow (consecutive rows, i.e. streams of one row each, ran at half the speed
//   when W comes from DRAM). Every weight byte is read from memory once and used for all M rows.
// - M > kGemvRows (prefill, batched decode): each thread walks its range in panels of weight rows sized
//   for L2; for every panel, the rows of x go by in tiles of kGemmRows, so each weight block is unpacked
//   once per tile and used kGemmRows times, and W is read from memory once per call.
// The activations are quantized once up front (in parallel over rows when there are many).
//
// Instruction sets: this file has the AVX2 tiles, the activation quantization and the driver (run) and
// registers the ops; qmatmul_avx512.cpp has the AVX-512 VNNI tiles (vpdpbusd), which the op qmatmul_vnni runs
// through the same driver and quantization (plus a regrouped copy of the quantized activations, struct Act in
// qmatmul.h), after checking the CPU at run time. The shared types are in qmatmul.h. The tiles for W interleaved by
// 8 rows are one template for both (qmatmul_interleaved.h), compiled into each unit for its instruction set.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#include "qmatmul.h"
#include "../thread_pool.h"

namespace {

using namespace cpu_quant;

// ---- quantized activations -------------------------------------------------------------------------

// Rounds half away from zero, like C's roundf (exactly: the fraction is computed exactly).
ALWAYS_INLINE inline __m256 roundf_ps(__m256 v) {
  const __m256 sign_bit = _mm256_set1_ps(-0.0f);
  const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __m256 frac = _mm256_andnot_ps(sign_bit, _mm256_sub_ps(v, t));
  const __m256 step = _mm256_or_ps(_mm256_set1_ps(1.0f), _mm256_and_ps(v, sign_bit));  // +-1 as v
  const __m256 up = _mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ);
  return _mm256_add_ps(t, _mm256_and_ps(up, step));
}

// 4 x 8 int32 (elements 0..31 in order) -> 32 int8 in order, saturating to [-128, 127].
ALWAYS_INLINE inline __m256i pack_i8(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  const __m256i a = _mm256_packs_epi32(i0, i1);  // 0-3 8-11 | 4-7 12-15
  const __m256i b = _mm256_packs_epi32(i2, i3);
  const __m256i c = _mm256_packs_epi16(a, b);    // 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31
  return _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

ALWAYS_INLINE inline __m256 abs_ps(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v); }

ALWAYS_INLINE inline float hmax8(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// quantize_row_q8_0_ref: d = amax / 127 (stored as fp16), q = roundf(x * (1 / d)).
void quantize_row_q8_0(const float* x, int64_t K, int8_t* qs, float* d, int16_t* c) {
  const __m256i eights = _mm256_set1_epi8(8);
  for (int64_t b = 0; b < K / kQK; ++b) {
    const float* xb = x + b * kQK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, abs_ps(v[i]));
    }
    const float dd = hmax8(amax) / 127.0f;
    const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
    d[b] = _cvtsh_ss(_cvtss_sh(dd, _MM_FROUND_TO_NEAREST_INT));
    const __m256 mul = _mm256_set1_ps(id);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) q[i] = _mm256_cvttps_epi32(roundf_ps(_mm256_mul_ps(v[i], mul)));
    const __m256i packed = pack_i8(q[0], q[1], q[2], q[3]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + b * kQK), packed);
    if (c) {
      const __m256i p = _mm256_maddubs_epi16(eights, packed);  // 8 (y[2i] + y[2i+1]) for i = 0..15
      const __m128i s = _mm_add_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + b * 8), s);
    }
  }
}

// quantize_row_q8_K_ref: max = the first element of largest magnitude, iscale = -127 / max,
// q = min(127, nearest_int(iscale * x)) (round half to even), d = 1 / iscale, plus the sums of 16.
void quantize_row_q8_K(const float* x, int64_t K, int8_t* qs, float* d, int16_t* bs16, int16_t* bs32) {
  for (int64_t b = 0; b < K / kQKK; ++b) {
    const float* xb = x + b * kQKK;
    int8_t* qb = qs + b * kQKK;
    __m256 amaxv = _mm256_setzero_ps();
    for (int i = 0; i < kQKK; i += 8) amaxv = _mm256_max_ps(amaxv, abs_ps(_mm256_loadu_ps(xb + i)));
    const float amax = hmax8(amaxv);
    if (!(amax > 0.0f)) {  // all zeros (or NaN: the reference's comparison never fires then either)
      d[b] = 0.0f;
      std::memset(qb, 0, kQKK);
      std::memset(bs16 + b * 16, 0, 16 * sizeof(int16_t));
      std::memset(bs32 + b * 8, 0, 8 * sizeof(int16_t));
      continue;
    }
    int j = 0;
    while (std::fabs(xb[j]) != amax) ++j;
    const float iscale = -127.0f / xb[j];
    const __m256 mul = _mm256_set1_ps(iscale);
    for (int i = 0; i < kQKK; i += 32) {
      __m256i q[4];
      for (int t = 0; t < 4; ++t)  // cvtps rounds to nearest even (MXCSR default), as nearest_int does
        q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + i + 8 * t), mul));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + i), pack_i8(q[0], q[1], q[2], q[3]));
    }
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int i = 0; i < 16; ++i) s += qb[g * 16 + i];
      bs16[b * 16 + g] = static_cast<int16_t>(s);
    }
    for (int g = 0; g < 8; ++g) bs32[b * 8 + g] = static_cast<int16_t>(bs16[b * 16 + 2 * g] + bs16[b * 16 + 2 * g + 1]);
    d[b] = 1.0f / iscale;
  }
}

// ---- tiles: MR rows of x (m0 ..) against G rows of W --------------------------------------------------
// A tile gets the G row pointers of W (a tail repeats the last row; its results are not stored) and writes
// the raw sums (before bias) to out[m * G + g]. What is computed for one output never depends on MR, G or
// the other rows in the tile: every vector operation below is lane-wise per output, and each output's
// lanes are reduced by the same fixed tree.

// The tiles for W interleaved by 8 rows (with AVX2's integer arithmetic, and the VNNI tiles' emulated for tests)
// and keep(), which the tiles below use too.
#include "qmatmul_interleaved.h"

// AVX2's integer arithmetic for the interleaved tiles: maddubs, runs added in int16, madd.
struct Avx2Int16 {
  static constexpr bool kVnni = false;
  static constexpr int kGemmRows = 4;  // rows of x per GEMM tile (16 vector registers)
};

// The VNNI tiles' arithmetic (qmatmul_avx512.cpp) with vpdpbusd emulated, for testing them on CPUs without it:
// exact for the interleaved tiles' quants (pairs of products of at most 5-bit unsigned values fit in int16).
struct EmulatedVnni {
  static constexpr bool kVnni = true;
  static constexpr int kGemmRows = kVnniInterleavedGemmRows;
  ALWAYS_INLINE static __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
};

// 16 bytes of each, one per 128-bit half.
ALWAYS_INLINE inline __m256i load_pair(const uint8_t* lo, const uint8_t* hi) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// 16 bytes into both 128-bit halves.
ALWAYS_INLINE inline __m256i bcast16(const void* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The fp16 scales at r0 and r1 as fp32, r0's in lanes 0..3, r1's in lanes 4..7.
ALWAYS_INLINE inline __m256 pair_scales(const uint8_t* r0, const uint8_t* r1) {
  uint16_t h0, h1;
  std::memcpy(&h0, r0, 2);
  std::memcpy(&h1, r1, 2);
  const __m128i h = _mm_cvtsi32_si128(static_cast<int>(h0 | (static_cast<uint32_t>(h1) << 16)));
  return _mm256_cvtph_ps(_mm_shuffle_epi8(h, _mm_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3)));
}

// q4_0 (Q4) and q8_0 weights against q8_0 activations, two rows of W per 256-bit vector: the 128-bit half h
// holds row 2p + h, its 4 lanes each the integer sum of 8 products of a block (elements 4i..4i+3 and
// 16+4i..16+4i+3), scaled by fp32(d_w) * fp32(d_x) and accumulated with one fmadd per block. An output is
// the sum of its half's 4 lanes (hsum4) at the end.
template <int MR, int NP, bool Q4>
void tile_q0(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t BB = Q4 ? 18 : 34;
  constexpr int G = 2 * NP;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = a.nb, K = a.K;
  __m256 acc[MR][NP];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int p = 0; p < NP; ++p) acc[m][p] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    UNROLL for (int p = 0; p < NP; ++p) {
      const uint8_t* r0 = w[2 * p] + b * BB;
      const uint8_t* r1 = w[2 * p + 1] + b * BB;
      const __m256 dx = pair_scales(r0, r1);
      __m256i A, B;  // elements 0..15 and 16..31 of the block, of both rows
      if constexpr (Q4) {
        const __m256i t = load_pair(r0 + 2, r1 + 2);
        A = _mm256_and_si256(t, m4);
        B = _mm256_and_si256(_mm256_srli_epi16(t, 4), m4);
      } else {
        A = load_pair(r0 + 2, r1 + 2);
        B = load_pair(r0 + 18, r1 + 18);
      }
      const __m256i aA = Q4 ? A : _mm256_sign_epi8(A, A);
      const __m256i aB = Q4 ? B : _mm256_sign_epi8(B, B);
      UNROLL for (int m = 0; m < MR; ++m) {
        const int64_t ab = (m0 + m) * nb + b;
        const int8_t* y = a.qs + (m0 + m) * K + b * kQK;
        const __m256i yA = bcast16(y), yB = bcast16(y + 16);
        __m256i i32;
        if constexpr (Q4) {  // (q - 8) . y exactly: maddubs(q, y) - 8 * y, pairs of pairs in int16
          const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(A, yA), _mm256_maddubs_epi16(B, yB));
          i32 = _mm256_madd_epi16(_mm256_sub_epi16(p16, bcast16(a.c + ab * 8)), ones);
        } else {  // |q| . (y * sign(q)); int16 pairs can reach 32512, so widen before adding A and B
          i32 = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(aA, _mm256_sign_epi8(yA, A)), ones),
                                 _mm256_madd_epi16(_mm256_maddubs_epi16(aB, _mm256_sign_epi8(yB, B)), ones));
        }
        const __m256 dd = _mm256_mul_ps(dx, _mm256_broadcast_ss(a.d + ab));
        acc[m][p] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(i32), acc[m][p]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int p = 0; p < NP; ++p) {
    out[m * G + 2 * p] = hsum4(_mm256_castps256_ps128(acc[m][p]));
    out[m * G + 2 * p + 1] = hsum4(_mm256_extractf128_ps(acc[m][p], 1));
  }
}

// The int16 scale of sub-block s (0..7) in every lane, from the 8 scales as int16 in both halves.
ALWAYS_INLINE inline __m256i scale_lanes(__m256i scales16, int s) {
  return _mm256_shuffle_epi8(scales16, _mm256_set1_epi16(static_cast<int16_t>((2 * s) | ((2 * s + 1) << 8))));
}

// q4_K (HB = false) and q5_K (HB = true): x = d * sc * q - dmin * m per sub-block of 32. Per block and output:
// sumi (8 int32 lanes) = sum over sub-blocks of sc * (q . y) (exact), one fmadd of fp32(d_x * d_w) into acc;
// the mins' term (4 int32 lanes of m * bsum) one fmadd of fp32(-d_x * dmin_w) into accm. The output is
// hsum8(acc) + hsum4(accm).
template <int MR, int NR, bool HB>
void tile_q45_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t kBytes = HB ? 176 : 144;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i hbit = _mm256_set1_epi8(0x10);
  __m256 acc[MR][NR];
  __m128 accm[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) {
    acc[m][r] = _mm256_setzero_ps();
    accm[m][r] = _mm_setzero_ps();
  }
  const int64_t nb = a.nb, K = a.K;
  for (int64_t b = 0; b < nb; ++b) {
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w[r] + b * kBytes;
      // The block ~1 KiB ahead (3 cache lines cover a block): measured +20% on DRAM-bound q4_K decode.
      _mm_prefetch(reinterpret_cast<const char*>(blk + 1024), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + 1088), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + 1152), _MM_HINT_T0);
      const float dx = fp16_at(blk), dmx = fp16_at(blk + 2);
      const __m256i sm = _mm256_cvtepu8_epi16(kquant_scales_mins(blk + 4));  // 8 scales, 8 mins (int16)
      const __m128i mins = _mm256_extracti128_si256(sm, 1);
      const __m256i scales = _mm256_permute2x128_si256(sm, sm, 0x00);
      const uint8_t* qs = blk + (HB ? 48 : 16);
      __m256i hbits = _mm256_setzero_si256();
      if constexpr (HB) hbits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
      __m256i sumi[MR];
      UNROLL for (int m = 0; m < MR; ++m) sumi[m] = _mm256_setzero_si256();
      UNROLL for (int j = 0; j < 4; ++j) {  // 64 elements: the low nibbles of 32 bytes, then their high nibbles
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
        __m256i ql = _mm256_and_si256(bits, m4);
        __m256i qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
        if constexpr (HB) {  // bit 2j of qh[l] is element l's 5th bit, bit 2j+1 element 32+l's: move them to bit 4
          const int lo = 2 * j, hi = 2 * j + 1;
          const __m256i hl = lo <= 4 ? _mm256_slli_epi16(hbits, 4 - lo) : _mm256_srli_epi16(hbits, lo - 4);
          const __m256i hh = hi <= 4 ? _mm256_slli_epi16(hbits, 4 - hi) : _mm256_srli_epi16(hbits, hi - 4);
          ql = _mm256_or_si256(ql, _mm256_and_si256(hl, hbit));
          qh = _mm256_or_si256(qh, _mm256_and_si256(hh, hbit));
        }
        const __m256i sl = scale_lanes(scales, 2 * j), sh = scale_lanes(scales, 2 * j + 1);
        UNROLL for (int m = 0; m < MR; ++m) {
          const int8_t* y = a.qs + (m0 + m) * K + b * kQKK + 64 * j;
          const __m256i pl = _mm256_madd_epi16(
              sl, _mm256_maddubs_epi16(ql, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y))));
          const __m256i ph = _mm256_madd_epi16(
              sh, _mm256_maddubs_epi16(qh, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 32))));
          sumi[m] = keep(_mm256_add_epi32(sumi[m], _mm256_add_epi32(pl, ph)));
        }
      }
      UNROLL for (int m = 0; m < MR; ++m) {
        const int64_t ab = (m0 + m) * nb + b;
        const float dy = a.d[ab];
        acc[m][r] = _mm256_fmadd_ps(_mm256_set1_ps(dy * dx), _mm256_cvtepi32_ps(sumi[m]), acc[m][r]);
        const __m128i prod = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.bs32 + ab * 8)));
        accm[m][r] = _mm_fmadd_ps(_mm_set1_ps(-dy * dmx), _mm_cvtepi32_ps(prod), accm[m][r]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r)
    out[m * NR + r] = hsum8(acc[m][r]) + hsum4(accm[m][r]);
}

// q6_K: x = d * sc * (q - 32) per sub-block of 16, q 6-bit unsigned (the -32 through the sums of 16). Per
// block and output: sumi = sum sc * (q . y) - 32 * sum sc * bsum16 (exact int32 lanes), one fmadd of
// fp32(d_x * d_w) into acc; the output is hsum8(acc).
template <int MR, int NR>
void tile_q6_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  const __m256i m15 = _mm256_set1_epi8(0x0F);
  const __m256i m3 = _mm256_set1_epi8(0x30);
  __m256 acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  const int64_t nb = a.nb, K = a.K;
  for (int64_t b = 0; b < nb; ++b) {
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w[r] + b * 210;
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
      const float dx = fp16_at(blk + 208);
      __m256i sumi[MR];
      UNROLL for (int m = 0; m < MR; ++m) {  // - 32 * sum_g sc[g] * bsum16[g]
        const __m256i bs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.bs16 + ((m0 + m) * nb + b) * 16));
        sumi[m] = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5));
      }
      UNROLL for (int j = 0; j < 2; ++j) {  // 128 elements: 4 vectors of 32
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * j));
        const __m256i l2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * j + 32));
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * j));
        __m256i q[4];
        q[0] = _mm256_or_si256(_mm256_and_si256(l1, m15), _mm256_and_si256(_mm256_slli_epi16(h, 4), m3));
        q[1] = _mm256_or_si256(_mm256_and_si256(l2, m15), _mm256_and_si256(_mm256_slli_epi16(h, 2), m3));
        q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m15), _mm256_and_si256(h, m3));
        q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l2, 4), m15),
                               _mm256_and_si256(_mm256_srli_epi16(h, 2), m3));
        // The 8 scales of these 128 elements as int16, in both 128-bit halves.
        const __m256i sc = j == 0 ? _mm256_permute2x128_si256(sc16, sc16, 0x00)
                                  : _mm256_permute2x128_si256(sc16, sc16, 0x11);
        __m256i s[4];
        UNROLL for (int v = 0; v < 4; ++v) {  // vector v: sub-blocks 8j + 2v (lanes 0..7) and 8j + 2v + 1
          const int g = 2 * v;
          const __m128i lo = _mm_set1_epi16(static_cast<int16_t>((2 * g) | ((2 * g + 1) << 8)));
          const __m128i hi = _mm_set1_epi16(static_cast<int16_t>((2 * g + 2) | ((2 * g + 3) << 8)));
          s[v] = _mm256_shuffle_epi8(sc, _mm256_set_m128i(hi, lo));
        }
        UNROLL for (int m = 0; m < MR; ++m) {
          const int8_t* y = a.qs + (m0 + m) * K + b * kQKK + 128 * j;
          __m256i t = sumi[m];
          UNROLL for (int v = 0; v < 4; ++v) {
            const __m256i yv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 32 * v));
            t = keep(_mm256_add_epi32(t, _mm256_madd_epi16(s[v], _mm256_maddubs_epi16(q[v], yv))));
          }
          sumi[m] = t;
        }
      }
      UNROLL for (int m = 0; m < MR; ++m) {
        const float dy = a.d[(m0 + m) * nb + b];
        acc[m][r] = _mm256_fmadd_ps(_mm256_set1_ps(dy * dx), _mm256_cvtepi32_ps(sumi[m]), acc[m][r]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) out[m * NR + r] = hsum8(acc[m][r]);
}

// Affine groups (kAF4 / kAF8, layout in qmatmul.h): w = s * q + b, so an output is the sum over blocks of 32 of
// s * d_x * (q . y) + b * d_x * sum(y), with s and b those of the block's group. q . y is exact in int32 (4-bit:
// maddubs pairs reach 3810; 8-bit: widened to int16 and madd), scaled by fp32(d_x * s) into an 8-lane
// accumulator with one fmadd per block; the offset terms b * (d_x * sum(y)) go to a scalar with one explicit
// fma per block. An output is hsum8 of its lanes plus that scalar.
template <int MR, int NR, int BITS>
void tile_affine(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t CB = 16 * BITS;  // code bytes per super-block
  const int64_t S = a.pairs, SB = CB + 8 * S, nb = a.nb, K = a.K;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NR];
  float accb[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) {
    acc[m][r] = _mm256_setzero_ps();
    accb[m][r] = 0.0f;
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b >> 2, j = b & 3, pair = (j * S) >> 2;
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* sb = w[r] + g * SB;
      float s, off;
      std::memcpy(&s, sb + CB + 4 * pair, 4);
      std::memcpy(&off, sb + CB + 4 * (S + pair), 4);
      __m256i q, qlo, qhi;  // 4-bit: the block's 32 codes in order; 8-bit: its two halves widened to int16
      if constexpr (BITS == 4) {
        const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16 * j));
        q = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(t), _mm_srli_epi16(t, 4), 1), m4);
      } else {
        qlo = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 16 * j)));
        qhi = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 64 + 16 * j)));
      }
      UNROLL for (int m = 0; m < MR; ++m) {
        const int64_t ab = (m0 + m) * nb + b;
        const int8_t* y = a.qs + (m0 + m) * K + b * kQK;
        __m256i i32;
        if constexpr (BITS == 4) {
          i32 = _mm256_madd_epi16(
              _mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y))), ones);
        } else {
          const __m256i ylo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y)));
          const __m256i yhi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(y + 16)));
          i32 = _mm256_add_epi32(_mm256_madd_epi16(qlo, ylo), _mm256_madd_epi16(qhi, yhi));
        }
        acc[m][r] = _mm256_fmadd_ps(_mm256_set1_ps(a.d[ab] * s), _mm256_cvtepi32_ps(i32), acc[m][r]);
        accb[m][r] = std::fma(off, a.ys[ab], accb[m][r]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) out[m * NR + r] = hsum8(acc[m][r]) + accb[m][r];
}

// ---- driver -----------------------------------------------------------------------------------------

constexpr int kGemvRows = 4;  // AVX2: M up to this: one pass over W with all rows in the tile
constexpr int kGemmRows = 6;  // AVX2: M above: tiles of this many rows over L2-sized panels of W
constexpr int64_t kPanelBytes = 192 * 1024;  // bytes of W per GEMM work item (kept in L2 while x goes by)
constexpr int64_t kInlineMacs = int64_t(1) << 18;  // less work than this runs on the calling thread
// GEMV work items per thread (claimed dynamically). One per thread was as fast on a quiet 2-core VM and
// 12-21% slower (time-weighted, layer shapes of a 1B Llama) while it was contended; 8 gained nothing more.
constexpr int64_t kGemvItemsPerThread = 4;

// Rows of W per tile: for few rows of x, several (enough independent accumulators to hide the fmadd latency,
// and several streams through W in the GEMV); for many, few (registers). Measured on a 2-core Zen 3.
template <int MR>
Tile tile_for(int64_t t) {
  constexpr int NP = MR == 1 ? 4 : MR <= 4 ? 2 : 1;  // pairs of rows, q4_0 / q8_0
  constexpr int NR = MR == 1 ? 2 : 1;                // rows, k-quants
  constexpr int NA = MR == 1 ? 4 : MR <= 3 ? 2 : 1;  // rows, affine
  switch (t) {
    case kAF4: return {&tile_affine<MR, NA, 4>, NA};
    case kAF8: return {&tile_affine<MR, NA, 8>, NA};
    case kQ4_0: return {&tile_q0<MR, NP, true>, 2 * NP};
    case kQ8_0: return {&tile_q0<MR, NP, false>, 2 * NP};
    case kQ4_K: return {&tile_q45_K<MR, NR, false>, NR};
    case kQ5_K: return {&tile_q45_K<MR, NR, true>, NR};
    default: return {&tile_q6_K<MR, NR>, NR};
  }
}

Tile tile_fn(int64_t t, int64_t mr, int64_t /*K*/) {
  switch (mr) {
    case 1: return tile_for<1>(t);
    case 2: return tile_for<2>(t);
    case 3: return tile_for<3>(t);
    case 4: return tile_for<4>(t);
    case 5: return tile_for<5>(t);
    default: return tile_for<6>(t);
  }
}
static_assert(kGemmRows <= kMaxTileRowsOfX && kGemvRows <= kMaxTileRowsOfX, "tile_fn has tiles of up to 6 rows");

constexpr Kernels kAvx2{&tile_fn, kGemvRows, {kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows},
                        false, &interleaved_tiles<Avx2Int16>, Avx2Int16::kGemmRows};
// The AVX2 path with the VNNI interleaved tiles' arithmetic emulated (qmatmul_vnni_emulated, for tests).
constexpr Kernels kAvx2EmulatedVnni{&tile_fn, kGemvRows, {kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows, kGemmRows},
                                    false, &interleaved_tiles<EmulatedVnni>, EmulatedVnni::kGemmRows};
static_assert(kGemvRows <= Avx2Int16::kGemmRows && kGemvRows <= EmulatedVnni::kGemmRows,
              "the interleaved tiles go up to the GEMV's rows of x");

ALWAYS_INLINE inline void store_out(float* y, float v) { *y = v; }
ALWAYS_INLINE inline void store_out(at::BFloat16* y, float v) { *y = c10::BFloat16(v); }

// 8 consecutive outputs (+ their bias): the same values as store_out one by one (an fp32 add; bf16: c10's round
// to nearest even, NaN as 0x7FC0), vectorized (the scalar stores were ~5% of a q4_K prefill).
ALWAYS_INLINE inline void store8(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
ALWAYS_INLINE inline void store8(at::BFloat16* y, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i h = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  h = _mm256_blendv_epi8(h, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);  // 8 uint16 in the low half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(packed));
}

template <typename OutT>
void run(const Kernels& kern, int64_t qtype, const Act& act, int64_t M, const uint8_t* w, int64_t ldw, int64_t N,
         const float* bias, OutT* y, bool interleaved = false) {
  const int64_t K = act.K;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool gemv = M <= kern.gemv_rows;
  // The schedule counts units of W: rows, or (interleaved) groups of kInterleave rows; ldw is a unit's bytes.
  const int64_t unit = interleaved ? kInterleave : 1;
  const int64_t NU = N / unit;
  // Units per work item: a quarter of one thread's share for the GEMV (long sequential streams, and items
  // enough that a thread the hypervisor stalls leaves its last ones to the others), an L2-sized panel for the
  // GEMM (re-read from L2 by each tile of rows); and at least one item per thread. Items are whole multiples of
  // the largest tile (kMaxGroup rows, or kMaxUnitGroups groups), so that tails (tiles with repeated units) only
  // happen at the end of W.
  const int64_t gran = interleaved ? kMaxUnitGroups : kMaxGroup;
  const int64_t per_thread = (NU + threads - 1) / threads;
  int64_t panel = gemv ? (threads > 1 ? (NU + threads * kGemvItemsPerThread - 1) / (threads * kGemvItemsPerThread)
                                      : per_thread)
                       : std::max<int64_t>(gran, kPanelBytes / std::max<int64_t>(1, ldw));
  panel = std::min(panel, per_thread);
  panel = std::max<int64_t>(gran, (panel + gran - 1) / gran * gran);
  const int64_t items = (NU + panel - 1) / panel;

  auto work = [&](int64_t i0, int64_t i1) {
    float out[kMaxTileRowsOfX * kMaxGroup * kMaxUnitGroups];
    const uint8_t* rows[kMaxGroup];
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * panel, n1 = std::min(NU, n0 + panel);
      const int64_t mt = gemv ? M : interleaved ? kern.interleaved_gemm_rows : kern.gemm_rows[qtype];
      for (int64_t m0 = 0; m0 < M; m0 += mt) {
        const int64_t mr = std::min(mt, M - m0);
        const Tile tile = interleaved ? kern.interleaved(qtype, mr) : kern.tile(qtype, mr, K);
        const int g = tile.rows;
        const int64_t width = g * unit;  // outputs per row of x in `out`
        // GEMV: the g units of a tile come from g equal parts of the range, so that each is one long sequential
        // stream through W (what hardware prefetchers follow best); GEMM: g consecutive units.
        const int64_t len = n1 - n0;
        const int64_t stride = gemv ? (len + g - 1) / g : 1;
        const int64_t steps = gemv ? stride : (len + g - 1) / g;
        for (int64_t i = 0; i < steps; ++i) {
          int64_t col[kMaxGroup];
          for (int r = 0; r < g; ++r) {
            col[r] = gemv ? r * stride + i : i * g + r;
            rows[r] = w + (n0 + std::min(col[r], len - 1)) * ldw;
          }
          tile.fn(act, m0, rows, out);
          for (int r = 0; r < g; ++r) {
            if (col[r] >= len) continue;  // a repeated unit filling the tile
            if (interleaved) {  // a group's 8 outputs are consecutive in `out` and in y
              const int64_t n = (n0 + col[r]) * kInterleave;
              for (int64_t m = 0; m < mr; ++m) {
                __m256 v = _mm256_loadu_ps(out + m * width + r * kInterleave);
                if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
                store8(y + (m0 + m) * N + n, v);
              }
              continue;
            }
            for (int64_t l = 0; l < unit; ++l) {
              const int64_t n = (n0 + col[r]) * unit + l;
              const float bv = bias ? bias[n] : 0.0f;
              for (int64_t m = 0; m < mr; ++m) {
                const float v = out[m * width + r * unit + l];
                store_out(y + (m0 + m) * N + n, bias ? v + bv : v);
              }
            }
          }
        }
      }
    }
  };
  if (threads == 1 || items == 1 || M * N * K < kInlineMacs) {
    work(0, items);
  } else {
    mistralrs_pool::parallel_for(0, items, 1, work);
  }
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using AlignedBytes = std::unique_ptr<uint8_t[], FreeDeleter>;

// n zero bytes, 64-byte aligned.
AlignedBytes aligned_zeros(int64_t n) {
  const size_t size = static_cast<size_t>((n + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, size == 0 ? 64 : size);
  TORCH_CHECK(p != nullptr, "qmatmul: out of memory");
  std::memset(p, 0, size);
  return AlignedBytes(static_cast<uint8_t*>(p));
}

struct ActBuffers {
  std::unique_ptr<int8_t[]> qs;
  std::unique_ptr<float[]> d, ys;
  std::unique_ptr<int16_t[]> c, bs16, bs32;
  std::unique_ptr<int32_t[]> c32;
  AlignedBytes vq, vaux;
};

// Row r of the AVX-512 VNNI layout (struct Act) from its quantized row (qs, d, bs16, bs32). The buffers start
// zeroed (the padding blocks of q4_0/q8_0 stay zero).
void vnni_layout_row(int64_t qtype, const Act& a, int64_t r, int8_t* vq, uint8_t* vaux) {
  const int8_t* q = a.qs + r * a.K;
  const int64_t gb = vnni_group_bytes(qtype);
  if (is_kquant(qtype)) {
    static constexpr int kOrder[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // q4_K/q5_K; q6_K keeps 0..7
    for (int64_t b = 0; b < a.nb; ++b) {
      int8_t* dst = vq + (b * a.M + r) * gb;
      for (int i = 0; i < 8; ++i) std::memcpy(dst + 32 * i, q + b * kQKK + 32 * (qtype == kQ6_K ? i : kOrder[i]), 32);
      uint8_t* aux = vaux + b * a.vaux_stride;
      std::memcpy(aux + r * 4, a.d + r * a.nb + b, 4);
      std::memcpy(aux + a.kaux_bs32 + r * 16, a.bs32 + (r * a.nb + b) * 8, 16);
      std::memcpy(aux + a.kaux_bs16 + r * 32, a.bs16 + (r * a.nb + b) * 16, 32);
    }
    return;
  }
  const int64_t ab = a.vaux_stride / a.M;
  constexpr int64_t lanes = 4;
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* y = q + b * kQK;
    const int64_t g = b / kVnniQ0Blocks, j = b % kVnniQ0Blocks;
    int8_t* dst = vq + (g * a.M + r) * gb;
    std::memcpy(dst + 16 * j, y, 16);
    std::memcpy(dst + 64 + 16 * j, y + 16, 16);
    int32_t* negc = reinterpret_cast<int32_t*>(vaux + (g * a.M + r) * ab) + lanes * j;
    float* dexp = reinterpret_cast<float*>(vaux + (g * a.M + r) * ab) + kVnniQ0Blocks * lanes + lanes * j;
    for (int64_t l = 0; l < lanes; ++l) {
      int32_t s = 0;
      for (int i = 0; i < 4; ++i) s += y[4 * l + i] + y[16 + 4 * l + i];
      const float d = a.d[r * a.nb + b];
      if (is_affine(qtype))
        reinterpret_cast<float*>(negc)[l] = d * static_cast<float>(s);  // the offsets' term, d * sum(y)
      else
        negc[l] = (qtype == kQ4_0 ? -8 : -128) * s;
      dexp[l] = d;
    }
  }
}

// Quantize every row of x (fp32 or bf16, row stride ldx) to 8-bit blocks; `vnni`: also the AVX-512 VNNI layout;
// `interleaved`: for the interleaved tiles (q4_0: -8 * sum(y) per block, c32).
template <typename InT>
Act quantize_rows(const InT* x, int64_t ldx, int64_t M, int64_t K, int64_t qtype, ActBuffers& buf, bool vnni = false,
                  bool interleaved = false) {
  Act a;
  a.K = K;
  const bool kq = is_kquant(qtype);
  a.nb = K / (kq ? kQKK : kQK);
  buf.qs.reset(new int8_t[M * K]);
  buf.d.reset(new float[M * a.nb]);
  if (qtype == kQ4_0 && !vnni && !interleaved) buf.c.reset(new int16_t[M * a.nb * 8]);
  if (interleaved && qtype == kQ4_0) buf.c32.reset(new int32_t[M * a.nb]);
  if (is_affine(qtype) && !vnni) buf.ys.reset(new float[M * a.nb]);
  if (kq) {
    buf.bs16.reset(new int16_t[M * a.nb * 16]);
    buf.bs32.reset(new int16_t[M * a.nb * 8]);
  }
  a.qs = buf.qs.get();
  a.d = buf.d.get();
  a.ys = buf.ys.get();
  a.c = buf.c.get();
  a.c32 = buf.c32.get();
  a.bs16 = buf.bs16.get();
  a.bs32 = buf.bs32.get();
  if (vnni) {
    a.M = M;
    a.ngroups = kq ? a.nb : (a.nb + kVnniQ0Blocks - 1) / kVnniQ0Blocks;
    buf.vq = aligned_zeros(a.ngroups * M * vnni_group_bytes(qtype));
    a.vaux_stride = vnni_aux_stride(qtype, M);
    a.kaux_bs32 = vnni_bs32_offset(M);
    a.kaux_bs16 = vnni_bs16_offset(M);
    buf.vaux = aligned_zeros(a.ngroups * a.vaux_stride);
    a.vq = reinterpret_cast<const int8_t*>(buf.vq.get());
    a.vaux = buf.vaux.get();
  }
  auto rows = [&](int64_t r0, int64_t r1) {
    std::unique_ptr<float[]> tmp;
    if constexpr (!std::is_same_v<InT, float>) tmp.reset(new float[K]);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr;
      if constexpr (std::is_same_v<InT, float>) {
        xr = x + r * ldx;
      } else {
        const uint16_t* src = reinterpret_cast<const uint16_t*>(x + r * ldx);
        for (int64_t k = 0; k < K; ++k) {
          const uint32_t bits = static_cast<uint32_t>(src[k]) << 16;
          std::memcpy(&tmp[k], &bits, 4);
        }
        xr = tmp.get();
      }
      if (kq)
        quantize_row_q8_K(xr, K, buf.qs.get() + r * K, buf.d.get() + r * a.nb, buf.bs16.get() + r * a.nb * 16,
                          buf.bs32.get() + r * a.nb * 8);
      else
        quantize_row_q8_0(xr, K, buf.qs.get() + r * K, buf.d.get() + r * a.nb,
                          buf.c ? buf.c.get() + r * a.nb * 8 : nullptr);
      if (buf.c32) {
        for (int64_t b = 0; b < a.nb; ++b) {
          const int8_t* q = buf.qs.get() + r * K + b * kQK;
          int32_t sum = 0;
          for (int i = 0; i < kQK; ++i) sum += q[i];
          buf.c32[r * a.nb + b] = -8 * sum;
        }
      }
      if (buf.ys) {
        for (int64_t b = 0; b < a.nb; ++b) {
          const int8_t* q = buf.qs.get() + r * K + b * kQK;
          int32_t sum = 0;
          for (int i = 0; i < kQK; ++i) sum += q[i];
          buf.ys[r * a.nb + b] = buf.d[r * a.nb + b] * static_cast<float>(sum);
        }
      }
      if (vnni) vnni_layout_row(qtype, a, r, reinterpret_cast<int8_t*>(buf.vq.get()), buf.vaux.get());
    }
  };
  if (M >= 16 && M * K >= (int64_t(1) << 16))
    mistralrs_pool::parallel_for(0, M, 1, rows);
  else
    rows(0, M);
  return a;
}

// x: [M, K] bf16 or fp32 (rows contiguous); qweight: uint8 [N, row_bytes] contiguous (the canonical blocks, or
// the affine layout of qmatmul.h with `pairs`); bias: [N] or None. Returns [M, N] in x's dtype, or fp32 with out_f32.
at::Tensor qmatmul_with(const Kernels& kern, const at::Tensor& x, const at::Tensor& qweight,
                        const std::optional<at::Tensor>& bias, int64_t qtype, bool out_f32, int64_t pairs = 0) {
  TORCH_CHECK(qtype >= kQ4_0 && qtype < kNumQTypes, "qmatmul: unknown qtype ", qtype);
  TORCH_CHECK(x.dim() == 2, "qmatmul: x must be 2-D [M, K]");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte, "qmatmul: qweight must be uint8 [N, bytes]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "qmatmul: x must be fp32 or bf16");
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "qmatmul: CPU tensors only");
  TORCH_CHECK(qweight.is_contiguous(), "qmatmul: qweight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1);
  int64_t N = qweight.size(0);
  const int64_t be = block_elems(qtype);
  TORCH_CHECK(K % be == 0, "qmatmul: K = ", K, " is not a multiple of the block size ", be);
  int64_t row_bytes;
  bool interleaved = false;
  if (is_affine(qtype)) {
    TORCH_CHECK(pairs == 1 || pairs == 2 || pairs == 4, "qmatmul_affine: pairs must be 1, 2 or 4, got ", pairs);
    row_bytes = (K + kAffineSB - 1) / kAffineSB * affine_sb_bytes(qtype, pairs);
  } else {
    row_bytes = K / be * block_bytes(qtype);
    // [N / 8, nb * group block bytes]: q4_0 or q4_K interleaved by 8 rows (quant/ggml/interleave.py)
    const int64_t ib = interleaved_block_bytes(qtype);
    interleaved = ib > 0 && kern.interleaved != nullptr && row_bytes > 0 && qweight.size(1) == K / be * ib;
  }
  TORCH_CHECK(interleaved || qweight.size(1) == row_bytes, "qmatmul: qweight has ", qweight.size(1),
              " bytes per row, expected ", row_bytes, " for K = ", K);
  if (interleaved) N *= kInterleave;

  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "qmatmul: bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  const auto out_type = out_f32 ? at::kFloat : x.scalar_type();
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_type).memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    if (bias_ptr) return bias_f.to(out_type).unsqueeze(0).expand({M, N}).contiguous();
    return y.zero_();
  }
  ActBuffers buf;
  const bool vnni_layout = kern.vnni && !interleaved;  // (the interleaved tiles read the plain rows)
  Act act = xc.scalar_type() == at::kFloat
                ? quantize_rows(xc.data_ptr<float>(), xc.stride(0), M, K, qtype, buf, vnni_layout, interleaved)
                : quantize_rows(xc.data_ptr<at::BFloat16>(), xc.stride(0), M, K, qtype, buf, vnni_layout, interleaved);
  act.pairs = pairs;
  const uint8_t* w = qweight.data_ptr<uint8_t>();
  const int64_t ldw = qweight.size(1);
  if (out_type == at::kFloat)
    run(kern, qtype, act, M, w, ldw, N, bias_ptr, y.data_ptr<float>(), interleaved);
  else
    run(kern, qtype, act, M, w, ldw, N, bias_ptr, y.data_ptr<at::BFloat16>(), interleaved);
  return y;
}

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& bias,
                   int64_t qtype, bool out_f32) {
  TORCH_CHECK(!is_affine(qtype), "qmatmul: the affine types go through qmatmul_affine");
  return qmatmul_with(kAvx2, x, qweight, bias, qtype, out_f32);
}

// As qmatmul, with the interleaved tiles' integer dot products by AVX-VNNI's vpdpbusd where the CPU has it (and the
// compiler had it: qmatmul_avxvnni.cpp), else exactly qmatmul: the results are the same bit for bit either way.
at::Tensor qmatmul_avxvnni(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& bias,
                           int64_t qtype, bool out_f32) {
  TORCH_CHECK(!is_affine(qtype), "qmatmul_avxvnni: the affine types go through qmatmul_affine");
  static const Kernels kern = [] {
    Kernels k = kAvx2;
    const InterleavedTiles tiles = avxvnni_interleaved_tiles();
    if (tiles != nullptr) k.interleaved = tiles;
    return k;
  }();
  return qmatmul_with(kern, x, qweight, bias, qtype, out_f32);
}

// As qmatmul, with the VNNI interleaved tiles' arithmetic emulated by AVX2 instructions (bit for bit the VNNI
// results): tests check those tiles' logic with it on CPUs without VNNI. Canonical W takes the AVX2 tiles.
at::Tensor qmatmul_vnni_emulated(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& bias,
                                 int64_t qtype, bool out_f32) {
  TORCH_CHECK(!is_affine(qtype), "qmatmul_vnni_emulated: the affine types go through qmatmul_affine");
  return qmatmul_with(kAvx2EmulatedVnni, x, qweight, bias, qtype, out_f32);
}

// What the AVX-512 VNNI tiles need (checked here, at run time: the library itself loads on any AVX2 CPU).
bool cpu_has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return has;
}

// As qmatmul, with the AVX-512 VNNI tiles (same activation quantization; see qmatmul_avx512.cpp).
at::Tensor qmatmul_vnni(const at::Tensor& x, const at::Tensor& qweight, const std::optional<at::Tensor>& bias,
                        int64_t qtype, bool out_f32) {
  TORCH_CHECK(cpu_has_avx512_vnni(), "qmatmul_vnni: this CPU lacks avx512f/bw/vl/vnni");
  TORCH_CHECK(!is_affine(qtype), "qmatmul_vnni: the affine types go through qmatmul_affine");
  static const Kernels kern = avx512_vnni_kernels();
  return qmatmul_with(kern, x, qweight, bias, qtype, out_f32);
}

// Affine groups (qmatmul.h): bits 4 or 8, `pairs` (s, b) pairs per super-block of 128 weights; `vnni`: the
// AVX-512 VNNI tiles (only where the CPU has them), else the AVX2 ones.
at::Tensor qmatmul_affine(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                          int64_t bits, int64_t pairs, bool vnni, bool out_f32) {
  TORCH_CHECK(bits == 4 || bits == 8, "qmatmul_affine: bits must be 4 or 8, got ", bits);
  const int64_t qtype = bits == 4 ? kAF4 : kAF8;
  if (vnni) {
    TORCH_CHECK(cpu_has_avx512_vnni(), "qmatmul_affine: this CPU lacks avx512f/bw/vl/vnni");
    static const Kernels kern = avx512_vnni_kernels();
    return qmatmul_with(kern, x, packed, bias, qtype, out_f32, pairs);
  }
  return qmatmul_with(kAvx2, x, packed, bias, qtype, out_f32, pairs);
}

// The activation quantization alone, for tests: q8_0 -> (qs int8 [M, K], d fp32 [M, K/32]);
// q8_K -> (qs, d [M, K/256], bsums int16 [M, K/16]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_act(const at::Tensor& x, bool k_blocks) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "quantize_act: fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t qtype = k_blocks ? kQ4_K : kQ8_0;
  TORCH_CHECK(K % block_elems(qtype) == 0, "quantize_act: K must be a multiple of ", block_elems(qtype));
  ActBuffers buf;
  const Act a = quantize_rows(x.data_ptr<float>(), K, M, K, qtype, buf);
  at::Tensor qs = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor d = at::empty({M, a.nb}, x.options());
  at::Tensor bs = at::empty({M, k_blocks ? K / 16 : 0}, x.options().dtype(at::kShort));
  std::memcpy(qs.data_ptr<int8_t>(), a.qs, M * K);
  std::memcpy(d.data_ptr<float>(), a.d, M * a.nb * sizeof(float));
  if (k_blocks) std::memcpy(bs.data_ptr<int16_t>(), a.bs16, M * (K / 16) * sizeof(int16_t));
  return {qs, d, bs};
}

}  // namespace

namespace cpu_quant {
at::Tensor ggml_interleave(const at::Tensor& canonical, int64_t qtype);  // interleave.cpp
}  // namespace cpu_quant

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("qmatmul(Tensor x, Tensor qweight, Tensor? bias, int qtype, bool out_f32=False) -> Tensor");
  m.def("qmatmul_vnni(Tensor x, Tensor qweight, Tensor? bias, int qtype, bool out_f32=False) -> Tensor");
  m.def("qmatmul_avxvnni(Tensor x, Tensor qweight, Tensor? bias, int qtype, bool out_f32=False) -> Tensor");
  m.def("qmatmul_vnni_emulated(Tensor x, Tensor qweight, Tensor? bias, int qtype, bool out_f32=False) -> Tensor");
  m.def("quantize_act(Tensor x, bool k_blocks) -> (Tensor, Tensor, Tensor)");
  m.def("ggml_interleave(Tensor canonical, int qtype) -> Tensor");
  m.def("qmatmul_affine(Tensor x, Tensor packed, Tensor? bias, int bits, int pairs, bool vnni, bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("qmatmul", &qmatmul);
  m.impl("qmatmul_vnni", &qmatmul_vnni);
  m.impl("qmatmul_avxvnni", &qmatmul_avxvnni);
  m.impl("qmatmul_vnni_emulated", &qmatmul_vnni_emulated);
  m.impl("quantize_act", &quantize_act);
  m.impl("ggml_interleave", &cpu_quant::ggml_interleave);
  m.impl("qmatmul_affine", &qmatmul_affine);
}
