// The quantized matmul's tiles for AVX-512 VNNI CPUs (avx512f, avx512bw, avx512vl, avx512vnni): 512-bit vpdpbusd
// (unsigned 8-bit x signed 8-bit dot products of 4, accumulated in int32) on llama.cpp's canonical block bytes,
// against the same quantized activations as the AVX2 tiles (qmatmul.cpp quantizes them and runs the driver;
// this file only has tiles, compiled for AVX-512 by the pragma below and called only where the CPU has it).
//
// The batch-invariance contract is qmatmul.cpp's: every output's arithmetic depends only on its row of x and
// its row of W (integer lanes, exact; one fmadd per block or group of blocks in a fixed order; one fixed
// horizontal-sum tree), never on the tile, the batch or the thread count; -ffp-contract=off, explicit fmadds.
//
// - q4_0 / q8_0: one row of W, 4 consecutive blocks per step. The blocks' 16 (q4_0) or 32 (q8_0) quant bytes
//   are gathered out of their 18- or 34-byte blocks with vpermt2w (the blocks are word-aligned), and so are
//   their fp16 scales. vpdpbusd multiplies unsigned by signed bytes: q4_0's nibbles are unsigned (0..15) and
//   the -8 is added back through the activations' sums (the dot products start from -8 * sum(y) of their
//   lane); q8_0's quants are made unsigned by flipping the sign bit (q + 128) and the dot products start from
//   -128 * sum(y). A step gives 16 int32 lanes, 4 per block (q4_0) or 8 per block (2 vectors, q8_0), scaled by
//   fp32(d_w) * fp32(d_x) per lane and accumulated with one fmadd per vector; the output is the sum of the
//   16 lanes at the end. (The int lanes are the AVX2 tile's, the float accumulation order is not: results
//   agree with the AVX2 path to fp32 rounding, not bit for bit.)
// - q4_K / q5_K / q6_K: as the AVX2 tiles, with 64 quants per vpdpbusd (two sub-blocks, each int32 lane the dot
//   product of 4, which fits in int16) and the sub-block scales applied with vpdpwssd (int16 pairs: the lane
//   times its scale, plus its zero high half times 0). Each super-block's 16 lanes are folded to the AVX2
//   tile's 8 (lane i and i + 8 are the AVX2 lane i's two halves; integers, exact) before the same fp32
//   scaling, accumulation and sums: the k-quants give the AVX2 path's results bit for bit.
// - Decode (one row of x) has its own k-quant tiles, gemv_q45_K and gemv_q6_K, with the same arithmetic per
//   output: there, with nothing to share between rows of x, the GEMV was compute-bound (as fast from L2 as from
//   DRAM), so four rows of W share what is not their dot products (scale decoding, the fold, conversion and
//   fmadd with two rows of W per accumulator, the activation loads), and the sub-block scales are spread with
//   vpshufb rather than vpermw.
//
// - W interleaved by 8 rows (q4_0, q4_K, q5_K): the template of qmatmul_interleaved.h with 256-bit vpdpbusd (the
//   AVX2 unit's results bit for bit); they read the plain quantized rows, not the VNNI layout below.
//
// The activations come in the VNNI layout of qmatmul.h (struct Act): group-major and 64-byte aligned, so a
// tile reaches all its rows of x through one pointer per group (GCC otherwise runs out of general registers
// and moves pointers through vector registers) and no load splits a cache line (which cost 20% alone).
// Per group and row of W, the weight bytes are unpacked once and used for every row of x in the tile.
//
// Nothing here runs at load time (no static constructors): the library loads on AVX2-only CPUs.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "qmatmul.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")

namespace {

using namespace cpu_quant;

// The tiles for W interleaved by 8 rows (shared with the AVX2 unit, compiled here for AVX-512), with vpdpbusd.
#include "qmatmul_interleaved.h"

struct Vnni {
  static constexpr bool kVnni = true;
  static constexpr int kGemmRows = kVnniInterleavedGemmRows;
  ALWAYS_INLINE static __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(acc, u, s); }
};

ALWAYS_INLINE inline float hsum16(__m512 v) {
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

ALWAYS_INLINE inline __m512i load_idx(const uint16_t* p) { return _mm512_loadu_si512(p); }

// The first n bytes at p, at most 64 (the rest zero; nothing past them is read).
ALWAYS_INLINE inline __m512i load_first(const uint8_t* p, int64_t n) {
  if (n <= 0) return _mm512_setzero_si512();
  return _mm512_maskz_loadu_epi8(n >= 64 ? ~__mmask64(0) : static_cast<__mmask64>((uint64_t(1) << n) - 1), p);
}

// vpermt2w indices (word w of the result = word idx[w] of the 128 bytes of two registers).
// q4_0, 4 blocks of 18 bytes: the quants of block j (words 9j+1 .. 9j+8) to 128-bit lane j; the scales
// (word 9j) to words 4j .. 4j+3.
alignas(64) const uint16_t kQ4Quants[32] = {1,  2,  3,  4,  5,  6,  7,  8,  10, 11, 12, 13, 14, 15, 16, 17,
                                            19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30, 31, 32, 33, 34, 35};
alignas(64) const uint16_t kQ4Scales[32] = {0, 0, 0, 0, 9, 9, 9, 9, 18, 18, 18, 18, 27, 27, 27, 27,
                                            0, 0, 0, 0, 0, 0, 0, 0, 0,  0,  0,  0,  0,  0,  0,  0};
// q8_0, 4 blocks of 34 bytes: the first 16 quants of block j (words 17j+1 .. 17j+8 of the 128 bytes from the
// group's start) and its last 16 (words 17j+5 .. 17j+12 of the 128 bytes from byte 8) to 128-bit lane j; the
// scales (word 17j) to words 4j .. 4j+3.
alignas(64) const uint16_t kQ8Lo[32] = {1,  2,  3,  4,  5,  6,  7,  8,  18, 19, 20, 21, 22, 23, 24, 25,
                                        35, 36, 37, 38, 39, 40, 41, 42, 52, 53, 54, 55, 56, 57, 58, 59};
alignas(64) const uint16_t kQ8Hi[32] = {5,  6,  7,  8,  9,  10, 11, 12, 22, 23, 24, 25, 26, 27, 28, 29,
                                        39, 40, 41, 42, 43, 44, 45, 46, 56, 57, 58, 59, 60, 61, 62, 63};
alignas(64) const uint16_t kQ8Scales[32] = {0, 0, 0, 0, 17, 17, 17, 17, 34, 34, 34, 34, 51, 51, 51, 51,
                                            0, 0, 0, 0, 0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
// vpermw indices spreading int16 scales over int32 lanes (even words; the odd ones are zeroed by the mask):
// q4_K/q5_K, the 4 vectors of a super-block hold sub-blocks (0, 2), (1, 3), (4, 6), (5, 7) (lanes 0..7, 8..15);
// q6_K, half h's vectors hold sub-blocks of 16 8h + i/4 (low nibbles) and 8h + 4 + i/4 (high) in lane i.
alignas(64) const uint16_t kKScales[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0, 2, 0},
    {1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0, 3, 0},
    {4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0, 6, 0},
    {5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 5, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0, 7, 0}};
alignas(64) const uint16_t kQ6Scales[4][32] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 0, 2, 0, 2, 0, 2, 0, 3, 0, 3, 0, 3, 0, 3, 0},
    {4, 0, 4, 0, 4, 0, 4, 0, 5, 0, 5, 0, 5, 0, 5, 0, 6, 0, 6, 0, 6, 0, 6, 0, 7, 0, 7, 0, 7, 0, 7, 0},
    {8, 0, 8, 0, 8, 0, 8, 0, 9, 0, 9, 0, 9, 0, 9, 0, 10, 0, 10, 0, 10, 0, 10, 0, 11, 0, 11, 0, 11, 0, 11, 0},
    {12, 0, 12, 0, 12, 0, 12, 0, 13, 0, 13, 0, 13, 0, 13, 0, 14, 0, 14, 0, 14, 0, 14, 0, 15, 0, 15, 0, 15, 0, 15, 0}};
constexpr __mmask32 kEvenWords = 0x55555555u;

// How far ahead in its row the decode tiles prefetch each row of W (software prefetch: on a loaded VM the
// hardware prefetchers fall behind; measured with 4 rows of W per tile, q6_K's LM head streamed 1.44x faster
// time-weighted over a minute of alternating passes, up to 2.5x in contended stretches, ~5% slower in quiet ones).
constexpr int64_t kPrefetchAhead = 1024;

// The int16 value of each int32 lane (it fits) times the int16 scale in the lane's low half, added to acc.
ALWAYS_INLINE inline __m512i add_scaled(__m512i acc, __m512i dots, __m512i scales) {
  return _mm512_dpwssd_epi32(acc, dots, scales);
}

// A 16-lane int32 sum folded to 8 lanes: lane i + lane i + 8.
ALWAYS_INLINE inline __m256i fold8(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// ---- q4_0 / q8_0 ----------------------------------------------------------------------------------------

// One row of W's group of 4 blocks, unpacked: the first and last 16 quants of each block as unsigned bytes
// (q4_0's nibbles; q8_0's quants + 128), the scales as fp32 per lane. FULL: the 4 blocks are all there (plain
// loads); otherwise `avail` bytes are (masked loads, nothing past them read; the missing blocks meet zero
// activations, so they add exact zeros).
template <bool Q4, bool FULL>
ALWAYS_INLINE inline void unpack_q0(const uint8_t* p, int64_t avail, __m512i ilo, __m512i ihi, __m512i isc,
                                    __m512i& v0, __m512i& v1, __m512& dw) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i z0 = FULL ? _mm512_loadu_si512(p) : load_first(p, std::min<int64_t>(avail, 64));
  __m512i z1;
  if constexpr (Q4) {
    z1 = FULL ? _mm512_castsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 64)))
              : load_first(p + 64, avail - 64);
  } else {
    z1 = FULL ? _mm512_loadu_si512(p + 64) : load_first(p + 64, avail - 64);
  }
  dw = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(z0, isc, z1)));
  if constexpr (Q4) {
    const __m512i nib = _mm512_permutex2var_epi16(z0, ilo, z1);
    v0 = _mm512_and_si512(nib, m4);
    v1 = _mm512_and_si512(_mm512_srli_epi16(nib, 4), m4);
  } else {  // the last 16 quants from the 128 bytes at byte 8 (the group's 136 bytes end there)
    const __m512i z2 = FULL ? _mm512_loadu_si512(p + 8) : load_first(p + 8, std::min<int64_t>(avail - 8, 64));
    const __m512i z3 = FULL ? _mm512_loadu_si512(p + 72) : load_first(p + 72, avail - 72);
    v0 = _mm512_xor_si512(_mm512_permutex2var_epi16(z0, ilo, z1), sign);
    v1 = _mm512_xor_si512(_mm512_permutex2var_epi16(z2, ihi, z3), sign);
  }
}

// One group (4 blocks) of MR rows of x against NR rows of W, added to acc. Lane l of block j is the dot product
// of its quants 4l..4l+3 and 16+4l..16+4l+3, started from the activations' offset for that lane, times
// fp32(d_w) * fp32(d_x), one fmadd per vector.
template <int MR, int NR, bool Q4, bool FULL>
ALWAYS_INLINE inline void group_q0(const Act& a, int64_t m0, const uint8_t* const* w, int64_t g, int64_t avail,
                                   __m512i ilo, __m512i ihi, __m512i isc, __m512 (&acc)[MR][NR]) {
  constexpr int64_t BB = Q4 ? 18 : 34;
  constexpr int64_t GB = 128, AB = 128;  // vq and vaux bytes per group and row
  const int8_t* yg = a.vq + (g * a.M + m0) * GB;
  const uint8_t* ag = a.vaux + g * a.vaux_stride + m0 * AB;
  if constexpr (MR == 1) {
    // One row of x (decode): its vectors stay in registers and each row of W is unpacked and used at once, so
    // that only one row's unpacked vectors are live (all NR of them at once spill).
    const __m512i y0 = _mm512_load_si512(yg), y1 = _mm512_load_si512(yg + 64);
    const __m512i c = _mm512_load_si512(ag);
    const __m512 dx = _mm512_load_ps(ag + 64);
    UNROLL for (int r = 0; r < NR; ++r) {
      __m512i v0, v1;
      __m512 dw;
      if constexpr (Q4) {
        const char* pf = reinterpret_cast<const char*>(w[r] + 4 * g * BB) + kPrefetchAhead;
        _mm_prefetch(pf, _MM_HINT_T0);
        _mm_prefetch(pf + 64, _MM_HINT_T0);
      }
      unpack_q0<Q4, FULL>(w[r] + 4 * g * BB, avail, ilo, ihi, isc, v0, v1, dw);
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(c, v0, y0), v1, y1);
      acc[0][r] = _mm512_fmadd_ps(_mm512_mul_ps(dw, dx), _mm512_cvtepi32_ps(s), acc[0][r]);
    }
  } else {
    // Several rows of x: every row of W's group unpacked once, then used for each row of x.
    __m512i v0[NR], v1[NR];
    __m512 dw[NR];
    UNROLL for (int r = 0; r < NR; ++r) unpack_q0<Q4, FULL>(w[r] + 4 * g * BB, avail, ilo, ihi, isc, v0[r], v1[r], dw[r]);
    UNROLL for (int m = 0; m < MR; ++m) {
      const int8_t* y = yg + m * GB;
      const int32_t* c = reinterpret_cast<const int32_t*>(ag + m * AB);  // offsets, then the scales
      const float* dx = reinterpret_cast<const float*>(c) + 16;
      UNROLL for (int r = 0; r < NR; ++r) {
        __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512(c), v0[r], _mm512_load_si512(y));
        s = _mm512_dpbusd_epi32(s, v1[r], _mm512_load_si512(y + 64));
        acc[m][r] = _mm512_fmadd_ps(_mm512_mul_ps(dw[r], _mm512_load_ps(dx)), _mm512_cvtepi32_ps(s), acc[m][r]);
      }
    }
  }
}

// MR rows of x against NR rows of W, 4 blocks per step: the full groups, then a last group of fewer blocks.
// Both formats end up as two 64-byte vectors per row of W and group, the first 16 and the last 16 quants of the
// 4 blocks (128-bit lane j: block j), so the dot products, scales and accumulation are one code.
template <int MR, int NR, bool Q4>
void tile_q0(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t BB = Q4 ? 18 : 34;
  const __m512i ilo = load_idx(Q4 ? kQ4Quants : kQ8Lo), ihi = load_idx(kQ8Hi);
  const __m512i isc = load_idx(Q4 ? kQ4Scales : kQ8Scales);
  __m512 acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t full = a.nb / 4;
  for (int64_t g = 0; g < full; ++g) group_q0<MR, NR, Q4, true>(a, m0, w, g, 4 * BB, ilo, ihi, isc, acc);
  if (full < a.ngroups) group_q0<MR, NR, Q4, false>(a, m0, w, full, (a.nb - 4 * full) * BB, ilo, ihi, isc, acc);
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) out[m * NR + r] = hsum16(acc[m][r]);
}

// ---- q4_K / q5_K / q6_K ---------------------------------------------------------------------------------

// The k-quant tiles keep the AVX2 tile's per-output arithmetic (8 int32 lanes per super-block, one fmadd of
// fp32(d_x * d_w), a 4-lane accumulator of the q4_K/q5_K mins' term, hsum8 + hsum4) but hold two rows of x per
// 512-bit accumulator (lanes 0..7 row 2p, lanes 8..15 row 2p + 1) and four rows' mins terms per 512-bit
// vector (lanes 4i..4i+3 row 4q + i), so that the conversion, scaling and accumulation of a super-block are
// one instruction per 2 (or 4) rows. Every lane's operations are those of the AVX2 tile for its row and the
// scale products are the same fp32 products, computed for several rows at once.

// The 16-lane sums s0 (row 2p) and s1 (row 2p + 1) folded to 8 lanes each: [lo(s0) + hi(s0) | lo(s1) + hi(s1)].
ALWAYS_INLINE inline __m512i fold_pair(__m512i s0, __m512i s1) {
  return _mm512_add_epi32(_mm512_shuffle_i64x2(s0, s1, 0x44), _mm512_shuffle_i64x2(s0, s1, 0xEE));
}

// Lanes 0..7 value v[2p], lanes 8..15 v[2p + 1].
ALWAYS_INLINE inline __m512 spread_pair(__m512 v, int p) {
  return _mm512_permutexvar_ps(_mm512_inserti64x4(_mm512_set1_epi32(2 * p), _mm256_set1_epi32(2 * p + 1), 1), v);
}

// Lanes 4i..4i+3 value v[4q + i].
ALWAYS_INLINE inline __m512 spread_quad(__m512 v, int q) {
  return _mm512_permutexvar_ps(_mm512_setr_epi32(4 * q, 4 * q, 4 * q, 4 * q, 4 * q + 1, 4 * q + 1, 4 * q + 1,
                                                 4 * q + 1, 4 * q + 2, 4 * q + 2, 4 * q + 2, 4 * q + 2, 4 * q + 3,
                                                 4 * q + 3, 4 * q + 3, 4 * q + 3), v);
}

// n (<= 16) fp32 at p, the rest zero.
ALWAYS_INLINE inline __m512 load_floats(const void* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}

// The tiles' outputs: row m's 8-lane sum from the pair accumulators, plus (q4_K/q5_K) its 4-lane mins term.
template <int MR, int NR, bool MINS>
ALWAYS_INLINE inline void store_k(const __m512 (&acc)[(MR + 1) / 2][NR], const __m512 (&accm)[(MR + 3) / 4][NR],
                                  float* out) {
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) {
    const __m512 pa = acc[m / 2][r];
    const __m256 half = m % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pa), 1))
                              : _mm512_castps512_ps256(pa);
    float v = hsum8(half);
    if constexpr (MINS) {
      const __m512 qa = accm[m / 4][r];
      __m128 quarter;
      switch (m % 4) {
        case 0: quarter = _mm512_castps512_ps128(qa); break;
        case 1: quarter = _mm512_extractf32x4_ps(qa, 1); break;
        case 2: quarter = _mm512_extractf32x4_ps(qa, 2); break;
        default: quarter = _mm512_extractf32x4_ps(qa, 3); break;
      }
      v += hsum4(quarter);
    }
    out[m * NR + r] = v;
  }
}

// q4_K (HB = false) and q5_K (HB = true): x = d * sc * q - dmin * m per sub-block of 32. The 128 nibble bytes as
// two 64-byte vectors: their low nibbles are sub-blocks (0, 2) and (4, 6), their high nibbles (1, 3) and (5, 7),
// which is the order of the activations' vq (struct Act). q5_K's fifth bit of sub-block s is bit s of its 32
// high-bit bytes.
template <int MR, int NR, bool HB>
void tile_q45_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t kBytes = HB ? 176 : 144;
  constexpr int P = (MR + 1) / 2, Q = (MR + 3) / 4;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i bit4 = _mm512_set1_epi8(0x10);
  __m512i sidx[4], hshift[4];
  UNROLL for (int v = 0; v < 4; ++v) {
    sidx[v] = load_idx(kKScales[v]);
    static constexpr int kBit[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    hshift[v] = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(kBit[v][0])),
                                   _mm256_set1_epi16(static_cast<int16_t>(kBit[v][1])), 1);
  }
  __m512 acc[P][NR], accm[Q][NR];
  UNROLL for (int r = 0; r < NR; ++r) {
    UNROLL for (int p = 0; p < P; ++p) acc[p][r] = _mm512_setzero_ps();
    UNROLL for (int q = 0; q < Q; ++q) accm[q][r] = _mm512_setzero_ps();
  }
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* yb = a.vq + (b * a.M + m0) * 256;
    const uint8_t* xb = a.vaux + b * a.vaux_stride;
    const __m512 dy = load_floats(xb + m0 * 4, MR);  // d of the tile's rows
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w[r] + b * kBytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchAhead + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchAhead + 128), _MM_HINT_T0);
      const float dx = fp16_at(blk), dmx = fp16_at(blk + 2);
      const __m256i sm = _mm256_cvtepu8_epi16(kquant_scales_mins(blk + 4));  // 8 scales, 8 mins (int16)
      const __m512i mins = _mm512_broadcast_i32x4(_mm256_extracti128_si256(sm, 1));
      const __m512i sm512 = _mm512_castsi256_si512(sm);
      const uint8_t* qs = blk + (HB ? 48 : 16);
      const __m512i z0 = _mm512_loadu_si512(qs), z1 = _mm512_loadu_si512(qs + 64);
      __m512i q[4] = {_mm512_and_si512(z0, m4), _mm512_and_si512(_mm512_srli_epi16(z0, 4), m4),
                      _mm512_and_si512(z1, m4), _mm512_and_si512(_mm512_srli_epi16(z1, 4), m4)};
      if constexpr (HB) {
        const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
        UNROLL for (int v = 0; v < 4; ++v)  // q | ((hb >> bit) << 4) & 0x10
          q[v] = _mm512_ternarylogic_epi32(q[v], _mm512_slli_epi16(_mm512_srlv_epi16(hb, hshift[v]), 4), bit4, 0xF8);
      }
      __m512i sc[4];
      UNROLL for (int v = 0; v < 4; ++v) sc[v] = _mm512_maskz_permutexvar_epi16(kEvenWords, sidx[v], sm512);
      const __m512 dd = _mm512_mul_ps(dy, _mm512_set1_ps(dx));      // d_y * d_x per row, as the AVX2 tile
      const __m512 ddm = _mm512_mul_ps(dy, _mm512_set1_ps(-dmx));  // -d_y * dmin_x per row
      UNROLL for (int p = 0; p < P; ++p) {
        __m512i s[2];
        UNROLL for (int h = 0; h < 2; ++h) {
          s[h] = _mm512_setzero_si512();
          if (2 * p + h >= MR) continue;
          const int8_t* y = yb + (2 * p + h) * 256;
          UNROLL for (int v = 0; v < 4; ++v)
            s[h] = add_scaled(s[h], _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], _mm512_load_si512(y + 64 * v)),
                              sc[v]);
        }
        acc[p][r] = _mm512_fmadd_ps(spread_pair(dd, p), _mm512_cvtepi32_ps(fold_pair(s[0], s[1])), acc[p][r]);
      }
      UNROLL for (int qd = 0; qd < Q; ++qd) {  // mins . sums of 32, 4 int32 lanes per row (as the AVX2 tile)
        const int rows = MR - 4 * qd < 4 ? MR - 4 * qd : 4;
        const __m512i bs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (4 * rows)) - 1),
                                                    xb + a.kaux_bs32 + (m0 + 4 * qd) * 16);
        accm[qd][r] = _mm512_fmadd_ps(spread_quad(ddm, qd), _mm512_cvtepi32_ps(_mm512_madd_epi16(mins, bs)), accm[qd][r]);
      }
    }
  }
  store_k<MR, NR, true>(acc, accm, out);
}

// The 8 scales (bytes 0..7) and 8 mins (bytes 8..15) of four q4_K/q5_K blocks at once, block r's in 128-bit lane
// r (kquant_scales_mins on four rows; reads 16 bytes from each s12).
ALWAYS_INLINE inline __m512i kquant_scales_mins4(const uint8_t* s0, const uint8_t* s1, const uint8_t* s2, const uint8_t* s3) {
  __m512i s = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s0)));
  s = _mm512_inserti32x4(s, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s1)), 1);
  s = _mm512_inserti32x4(s, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s2)), 2);
  s = _mm512_inserti32x4(s, _mm_loadu_si128(reinterpret_cast<const __m128i*>(s3)), 3);
  const __m512i a = _mm512_shuffle_epi8(s, _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11)));
  const __m512i lo = _mm512_and_si512(_mm512_mask_blend_epi32(0x8888, a, _mm512_srli_epi16(a, 4)),
                                      _mm512_broadcast_i32x4(_mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15)));
  const __m512i b = _mm512_shuffle_epi8(s, _mm512_broadcast_i32x4(_mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7)));
  return _mm512_ternarylogic_epi32(lo, _mm512_srli_epi16(b, 2), _mm512_set1_epi8(0x30), 0xF8);  // lo | (b >> 2) & 0x30
}

// q4_K / q5_K against one row of x (decode): tile_q45_K<1, NR>'s arithmetic for every output, with the work
// that is not the dot products shared between four rows of W: their scales and mins decoded in one vector,
// two rows per 512-bit accumulator (lanes 0..7 row 2p, lanes 8..15 row 2p + 1; the fold, conversion and fmadd
// of a super-block are one instruction per two rows), the four rows' mins terms in one vector, their d and dmin
// loaded and scaled together, and the activations loaded once per super-block.
template <int NR, bool HB>
void gemv_q45_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  static_assert(NR == 4, "four rows of W: two accumulator pairs, one mins vector");
  constexpr int64_t kBytes = HB ? 176 : 144;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i bit4 = _mm512_set1_epi8(0x10);
  // vpshufb controls spreading the scale bytes over int32 lanes as kKScales does (zero-extended; -1 gives 0)
  __m512i sbyte[4], hshift[4];
  UNROLL for (int v = 0; v < 4; ++v) {
    static constexpr int kSub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    const __m128i lo = _mm_setr_epi8(kSub[v][0], -1, -1, -1, kSub[v][0], -1, -1, -1, kSub[v][0], -1, -1, -1, kSub[v][0], -1, -1, -1);
    const __m128i hi = _mm_setr_epi8(kSub[v][1], -1, -1, -1, kSub[v][1], -1, -1, -1, kSub[v][1], -1, -1, -1, kSub[v][1], -1, -1, -1);
    sbyte[v] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_broadcastsi128_si256(lo)), _mm256_broadcastsi128_si256(hi), 1);
    static constexpr int kBit[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    hshift[v] = _mm512_inserti64x4(_mm512_set1_epi16(static_cast<int16_t>(kBit[v][0])),
                                   _mm256_set1_epi16(static_cast<int16_t>(kBit[v][1])), 1);
  }
  // d (even) and -dmin (odd) of the 4 rows, spread: pair p's d over its two halves, the mins' -dmin over quarters
  const __m512i pair_idx[2] = {_mm512_inserti64x4(_mm512_set1_epi32(0), _mm256_set1_epi32(2), 1),
                               _mm512_inserti64x4(_mm512_set1_epi32(4), _mm256_set1_epi32(6), 1)};
  const __m512i quad_idx = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  const __m256 neg_odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, int(0x80000000), 0, int(0x80000000), 0,
                                                               int(0x80000000), 0, int(0x80000000)));
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512 accm = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* yb = a.vq + (b * a.M + m0) * 256;
    const uint8_t* xb = a.vaux + b * a.vaux_stride;
    const uint8_t* blk[4];
    UNROLL for (int r = 0; r < 4; ++r) blk[r] = w[r] + b * kBytes;
    __m512i y[4];
    UNROLL for (int v = 0; v < 4; ++v) y[v] = _mm512_load_si512(yb + 64 * v);
    const __m512i bs = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + a.kaux_bs32 + m0 * 16)));
    uint32_t dm[4];
    UNROLL for (int r = 0; r < 4; ++r) std::memcpy(&dm[r], blk[r], 4);
    const __m256 ddm = _mm256_mul_ps(_mm256_set1_ps(reinterpret_cast<const float*>(xb)[m0]),
                                     _mm256_xor_ps(_mm256_cvtph_ps(_mm_setr_epi32(int(dm[0]), int(dm[1]), int(dm[2]), int(dm[3]))), neg_odd));
    const __m512 ddm512 = _mm512_castps256_ps512(ddm);
    const __m512i dec = kquant_scales_mins4(blk[0] + 4, blk[1] + 4, blk[2] + 4, blk[3] + 4);
    const __m512i mins = _mm512_unpackhi_epi8(dec, _mm512_setzero_si512());    // 128-bit lane r: row r's mins
    __m512i s[4];
    UNROLL for (int r = 0; r < 4; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(blk[r] + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk[r] + kPrefetchAhead + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk[r] + kPrefetchAhead + 128), _MM_HINT_T0);
      const uint8_t* qs = blk[r] + (HB ? 48 : 16);
      const __m512i z0 = _mm512_loadu_si512(qs), z1 = _mm512_loadu_si512(qs + 64);
      __m512i q[4] = {_mm512_and_si512(z0, m4), _mm512_and_si512(_mm512_srli_epi16(z0, 4), m4),
                      _mm512_and_si512(z1, m4), _mm512_and_si512(_mm512_srli_epi16(z1, 4), m4)};
      if constexpr (HB) {
        const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[r] + 16)));
        UNROLL for (int v = 0; v < 4; ++v)
          q[v] = _mm512_ternarylogic_epi32(q[v], _mm512_slli_epi16(_mm512_srlv_epi16(hb, hshift[v]), 4), bit4, 0xF8);
      }
      const __m512i dr = _mm512_shuffle_i32x4(dec, dec, 0x55 * r);  // row r's scale bytes in every 128-bit lane
      s[r] = _mm512_setzero_si512();
      UNROLL for (int v = 0; v < 4; ++v)
        s[r] = add_scaled(s[r], _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[v], y[v]), _mm512_shuffle_epi8(dr, sbyte[v]));
    }
    UNROLL for (int p = 0; p < 2; ++p)
      acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair_idx[p], ddm512), _mm512_cvtepi32_ps(fold_pair(s[2 * p], s[2 * p + 1])), acc[p]);
    accm = _mm512_fmadd_ps(_mm512_permutexvar_ps(quad_idx, ddm512), _mm512_cvtepi32_ps(_mm512_madd_epi16(mins, bs)), accm);
  }
  UNROLL for (int r = 0; r < 4; ++r) {
    const __m512 pa = acc[r / 2];
    const __m256 half = r % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pa), 1)) : _mm512_castps512_ps256(pa);
    __m128 quarter;
    switch (r) {
      case 0: quarter = _mm512_castps512_ps128(accm); break;
      case 1: quarter = _mm512_extractf32x4_ps(accm, 1); break;
      case 2: quarter = _mm512_extractf32x4_ps(accm, 2); break;
      default: quarter = _mm512_extractf32x4_ps(accm, 3); break;
    }
    float v = hsum8(half);
    v += hsum4(quarter);
    out[r] = v;
  }
}

// q6_K: x = d * sc * (q - 32) per sub-block of 16 (as the AVX2 tile: the -32 through the sums of 16). Half h of a
// super-block: 64 low-nibble bytes (elements 128h + 0..63, their 2 high bits in bits 0-1 / 2-3 of the 32
// high-bit bytes) and their high nibbles (elements 128h + 64..127, bits 4-5 / 6-7).
template <int MR, int NR>
void tile_q6_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int P = (MR + 1) / 2;
  const __m512i m15 = _mm512_set1_epi8(0x0F);
  const __m512i m30 = _mm512_set1_epi8(0x30);
  const __m512i shl_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr_hi = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  __m512i sidx[4];
  UNROLL for (int v = 0; v < 4; ++v) sidx[v] = load_idx(kQ6Scales[v]);
  __m512 acc[P][NR];
  const __m512 accm[(MR + 3) / 4][NR] = {};  // no mins term
  UNROLL for (int p = 0; p < P; ++p) UNROLL for (int r = 0; r < NR; ++r) acc[p][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* yb = a.vq + (b * a.M + m0) * 256;
    const uint8_t* xb = a.vaux + b * a.vaux_stride;
    const __m512 dy = load_floats(xb + m0 * 4, MR);
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w[r] + b * 210;
      const uint8_t* ql = blk;
      const uint8_t* qh = blk + 128;
      const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
      const __m512i sc512 = _mm512_castsi256_si512(sc16);
      const __m512i sc16x2 = _mm512_broadcast_i64x4(sc16);
      const float dx = fp16_at(blk + 208);
      __m512i lo[2], hi[2], slo[2], shi[2];
      UNROLL for (int h = 0; h < 2; ++h) {
        const __m512i l = _mm512_loadu_si512(ql + 64 * h);
        const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h)));
        // (A & B) | C: the nibbles and the two high bits (masked to bits 4-5 first)
        lo[h] = _mm512_ternarylogic_epi32(l, m15, _mm512_and_si512(_mm512_sllv_epi16(hb, shl_lo), m30), 0xEA);
        hi[h] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), m15,
                                          _mm512_and_si512(_mm512_srlv_epi16(hb, shr_hi), m30), 0xEA);
        slo[h] = _mm512_maskz_permutexvar_epi16(kEvenWords, sidx[2 * h], sc512);
        shi[h] = _mm512_maskz_permutexvar_epi16(kEvenWords, sidx[2 * h + 1], sc512);
      }
      const __m512 dd = _mm512_mul_ps(dy, _mm512_set1_ps(dx));
      UNROLL for (int p = 0; p < P; ++p) {
        __m512i s[2];
        UNROLL for (int e = 0; e < 2; ++e) {
          s[e] = _mm512_setzero_si512();
          if (2 * p + e >= MR) continue;
          const int8_t* y = yb + (2 * p + e) * 256;
          UNROLL for (int h = 0; h < 2; ++h) {
            s[e] = add_scaled(s[e], _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[h], _mm512_load_si512(y + 128 * h)),
                              slo[h]);
            s[e] = add_scaled(s[e], _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[h],
                                                        _mm512_load_si512(y + 128 * h + 64)), shi[h]);
          }
        }
        // - 32 * sum_g sc[g] * bsum16[g] of both rows (8 lanes each), as the AVX2 tile
        const int rows = MR - 2 * p < 2 ? 1 : 2;
        const __m512i bs = _mm512_maskz_loadu_epi32(static_cast<__mmask16>(rows == 2 ? 0xFFFF : 0x00FF),
                                                    xb + a.kaux_bs16 + (m0 + 2 * p) * 32);
        const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_madd_epi16(bs, sc16x2), 5));
        const __m512i sumi = _mm512_add_epi32(init, fold_pair(s[0], s[1]));
        acc[p][r] = _mm512_fmadd_ps(spread_pair(dd, p), _mm512_cvtepi32_ps(sumi), acc[p][r]);
      }
    }
  }
  store_k<MR, NR, false>(acc, accm, out);
}

// q6_K against one row of x (decode): tile_q6_K<1, NR>'s arithmetic for every output, with four rows of W
// sharing what is not their dot products: two rows' 16 scales widened in one vector (which is also the table
// their sub-block scales are permuted from), their -32 * scales . sums-of-16 terms, folds, conversions and
// fmadds one instruction per two rows (lanes 0..7 row 2p, lanes 8..15 row 2p + 1), their d loaded and scaled
// together, and the activations loaded once per super-block.
template <int NR>
void gemv_q6_K(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  static_assert(NR == 4, "four rows of W: two accumulator pairs");
  const __m512i m15 = _mm512_set1_epi8(0x0F);
  const __m512i m30 = _mm512_set1_epi8(0x30);
  const __m512i shl_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
  const __m512i shr_hi = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
  // The pair's 32 scales (int16) regrouped so that 128-bit lane k holds row 2p's scales k, 4 + k, 8 + k, 12 + k
  // (words 0..3) and row 2p + 1's (words 4..7); then vector v of row 2p + e wants word 4e + v of every lane (as
  // kQ6Scales spreads them), which vpshufb puts in the low half of each int32 lane, zero in the high half.
  alignas(64) static constexpr uint16_t kRegroup[32] = {0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29,
                                                        2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
  const __m512i regroup = load_idx(kRegroup);
  __m512i sctl[2][4];
  UNROLL for (int e = 0; e < 2; ++e) UNROLL for (int v = 0; v < 4; ++v) {
    const char b0 = static_cast<char>(2 * (4 * e + v)), b1 = static_cast<char>(2 * (4 * e + v) + 1);
    sctl[e][v] = _mm512_broadcast_i32x4(_mm_setr_epi8(b0, b1, -1, -1, b0, b1, -1, -1, b0, b1, -1, -1, b0, b1, -1, -1));
  }
  const __m512i pair_idx[2] = {_mm512_inserti64x4(_mm512_set1_epi32(0), _mm256_set1_epi32(1), 1),
                               _mm512_inserti64x4(_mm512_set1_epi32(2), _mm256_set1_epi32(3), 1)};
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t b = 0; b < a.nb; ++b) {
    const int8_t* yb = a.vq + (b * a.M + m0) * 256;
    const uint8_t* xb = a.vaux + b * a.vaux_stride;
    const uint8_t* blk[4];
    UNROLL for (int r = 0; r < 4; ++r) blk[r] = w[r] + b * 210;
    UNROLL for (int r = 0; r < 4; ++r) {
      const char* pf = reinterpret_cast<const char*>(blk[r]) + kPrefetchAhead;
      _mm_prefetch(pf, _MM_HINT_T0);
      _mm_prefetch(pf + 64, _MM_HINT_T0);
      _mm_prefetch(pf + 128, _MM_HINT_T0);
      _mm_prefetch(pf + 192, _MM_HINT_T0);
    }
    __m512i y[4];
    UNROLL for (int v = 0; v < 4; ++v) y[v] = _mm512_load_si512(yb + 64 * v);
    const __m512i bs = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + a.kaux_bs16 + m0 * 32)));
    uint16_t dh[4];
    UNROLL for (int r = 0; r < 4; ++r) std::memcpy(&dh[r], blk[r] + 208, 2);
    const __m128 dd = _mm_mul_ps(_mm_set1_ps(reinterpret_cast<const float*>(xb)[m0]),
                                 _mm_cvtph_ps(_mm_setr_epi16(short(dh[0]), short(dh[1]), short(dh[2]), short(dh[3]), 0, 0, 0, 0)));
    const __m512 dd512 = _mm512_castps128_ps512(dd);
    UNROLL for (int p = 0; p < 2; ++p) {
      // the pair's 16 + 16 scales (int16): row 2p's in words 0..15, row 2p + 1's in words 16..31
      const __m512i sc = _mm512_cvtepi8_epi16(_mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[2 * p] + 192))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[2 * p + 1] + 192)), 1));
      const __m512i st = _mm512_permutexvar_epi16(regroup, sc);
      __m512i s[2];
      UNROLL for (int e = 0; e < 2; ++e) {
        const uint8_t* ql = blk[2 * p + e];
        const uint8_t* qh = ql + 128;
        s[e] = _mm512_setzero_si512();
        UNROLL for (int h = 0; h < 2; ++h) {
          const __m512i l = _mm512_loadu_si512(ql + 64 * h);
          const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h)));
          const __m512i lo = _mm512_ternarylogic_epi32(l, m15, _mm512_and_si512(_mm512_sllv_epi16(hb, shl_lo), m30), 0xEA);
          const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), m15,
                                                       _mm512_and_si512(_mm512_srlv_epi16(hb, shr_hi), m30), 0xEA);
          s[e] = add_scaled(s[e], _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, y[2 * h]),
                            _mm512_shuffle_epi8(st, sctl[e][2 * h]));
          s[e] = add_scaled(s[e], _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, y[2 * h + 1]),
                            _mm512_shuffle_epi8(st, sctl[e][2 * h + 1]));
        }
      }
      const __m512i init = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(_mm512_madd_epi16(bs, sc), 5));
      const __m512i sumi = _mm512_add_epi32(init, fold_pair(s[0], s[1]));
      acc[p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(pair_idx[p], dd512), _mm512_cvtepi32_ps(sumi), acc[p]);
    }
  }
  UNROLL for (int r = 0; r < 4; ++r) {
    const __m512 pa = acc[r / 2];
    out[r] = hsum8(r % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(pa), 1)) : _mm512_castps512_ps256(pa));
  }
}

// ---- affine groups (kAF4 / kAF8) ------------------------------------------------------------------------

// w = s * q + b (layout in qmatmul.h). Per super-block of 128 weights and row of W: the codes as two 64-byte
// vectors in the activations' VNNI order (4-bit: the low and high nibbles of its 64 bytes; 8-bit: its two
// halves), unsigned as vpdpbusd wants them; s and b spread over the 16 lanes (4 per block of 32) from the
// super-block's pairs. Per lane: acc += (d_x * (q . y)) * s, then acc += (d_x * sum(y)) * b, the second factor
// precomputed per lane with the activations; an output is hsum16 of its lanes.
template <int MR, int NR, int BITS>
void tile_affine(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t CB = 16 * BITS, GB = 128, AB = 128;
  const int64_t S = a.pairs, SB = CB + 8 * S, M = a.M;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i block = _mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 2);
  const __m512i sidx = _mm512_srli_epi32(_mm512_mullo_epi32(block, _mm512_set1_epi32(static_cast<int>(S))), 2);
  const __m512i bidx = _mm512_add_epi32(sidx, _mm512_set1_epi32(static_cast<int>(S)));
  const __mmask16 pm = static_cast<__mmask16>((1u << (2 * S)) - 1);
  __m512 acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.ngroups; ++g) {
    __m512i v0[NR], v1[NR];
    __m512 sv[NR], bv[NR];
    UNROLL for (int r = 0; r < NR; ++r) {
      const uint8_t* p = w[r] + g * SB;
      _mm_prefetch(reinterpret_cast<const char*>(p + 8 * SB), _MM_HINT_T0);
      if constexpr (BITS == 4) {
        const __m512i z = _mm512_loadu_si512(p);
        v0[r] = _mm512_and_si512(z, m4);
        v1[r] = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
      } else {
        v0[r] = _mm512_loadu_si512(p);
        v1[r] = _mm512_loadu_si512(p + 64);
      }
      const __m512 pr = _mm512_maskz_loadu_ps(pm, p + CB);
      sv[r] = _mm512_permutexvar_ps(sidx, pr);
      bv[r] = _mm512_permutexvar_ps(bidx, pr);
    }
    const int8_t* yg = a.vq + (g * M + m0) * GB;
    const uint8_t* ag = a.vaux + g * a.vaux_stride + m0 * AB;
    UNROLL for (int m = 0; m < MR; ++m) {
      const int8_t* y = yg + m * GB;
      const __m512 ys = _mm512_load_ps(ag + m * AB);
      const __m512 dx = _mm512_load_ps(ag + m * AB + 64);
      const __m512i y0 = _mm512_load_si512(y), y1 = _mm512_load_si512(y + 64);
      UNROLL for (int r = 0; r < NR; ++r) {
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v0[r], y0);
        s = _mm512_dpbusd_epi32(s, v1[r], y1);
        acc[m][r] = _mm512_fmadd_ps(_mm512_mul_ps(dx, _mm512_cvtepi32_ps(s)), sv[r], acc[m][r]);
        acc[m][r] = _mm512_fmadd_ps(ys, bv[r], acc[m][r]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) out[m * NR + r] = hsum16(acc[m][r]);
}

// ---- schedule -------------------------------------------------------------------------------------------

constexpr int kGemvRows = 4;   // M up to this: one pass over W with all rows of x in the tile
constexpr int kGemmRowsQ0 = 8;  // M above: tiles of this many rows over L2-sized panels of W (affine)
constexpr int kGemmRowsQ4 = 4;  // (q4_0, q8_0: 4 x 4 tiles)
constexpr int kGemmRowsK = 16;  // (k-quants: their per-super-block unpacking is dearer, their accumulators fewer)

template <int MR>
Tile tile_for(int64_t t) {
  // Rows of W, q4_0 / q8_0. Decoding q4_0 from DRAM, two rows of W per tile (two streams per thread) read 1.15-1.4x
  // faster than eight on a 2-core Zen 4 (in-process A/B); q8_0's longer rows keep eight (two lost 14% at K=8192).
  constexpr int NQ4 = MR == 1 ? 2 : 4;
  constexpr int NQ8 = MR == 1 ? 8 : MR == 2 ? 2 : 4;
  constexpr int NK = MR == 1 ? 4 : 1;  // rows of W, k-quants
  constexpr int NA = MR == 1 ? 4 : 2;  // rows of W, affine
  switch (t) {
    case kAF4:
      if constexpr (MR <= kGemmRowsQ0) return {&tile_affine<MR, NA, 4>, NA};
      break;
    case kAF8:
      if constexpr (MR <= kGemmRowsQ0) return {&tile_affine<MR, NA, 8>, NA};
      break;
    case kQ4_0:
      if constexpr (MR <= kGemmRowsQ4) return {&tile_q0<MR, NQ4, true>, NQ4};
      break;
    case kQ8_0:
      if constexpr (MR <= kGemmRowsQ4) return {&tile_q0<MR, NQ8, false>, NQ8};
      break;
    case kQ4_K:
      if constexpr (MR == 1) return {&gemv_q45_K<NK, false>, NK};
      return {&tile_q45_K<MR, NK, false>, NK};
    case kQ5_K:
      if constexpr (MR == 1) return {&gemv_q45_K<NK, true>, NK};
      return {&tile_q45_K<MR, NK, true>, NK};
    default:
      if constexpr (MR == 1) return {&gemv_q6_K<NK>, NK};
      return {&tile_q6_K<MR, NK>, NK};
  }
  return {nullptr, 0};  // never asked for (more rows than the type's GEMM tiles)
}

template <int... MRs>
Tile tile_fn_of(int64_t t, int64_t mr, std::integer_sequence<int, MRs...>) {
  Tile tile{nullptr, 0};
  ((mr == MRs + 1 ? (tile = tile_for<MRs + 1>(t), true) : false) || ...);
  return tile;
}

Tile tile_fn(int64_t t, int64_t mr, int64_t K) {
  // q8_0 decode over rows of up to 4096: four rows of W per tile (four streams per thread) read 7-8% faster than
  // eight from DRAM (2048-wide rows, in-process A/B on a 2-core Zen 4); 8192-wide rows keep eight (four lost 9-15%).
  if (t == kQ8_0 && mr == 1 && K <= 4096) return {&tile_q0<1, 4, false>, 4};
  return tile_fn_of(t, mr, std::make_integer_sequence<int, kGemmRowsK>{});
}
static_assert(kGemvRows <= kVnniInterleavedGemmRows && kVnniInterleavedGemmRows <= kMaxTileRowsOfX,
              "the interleaved tiles go up to the GEMV's rows of x");
static_assert(kGemmRowsQ4 <= kMaxTileRowsOfX && kGemmRowsQ0 <= kMaxTileRowsOfX && kGemmRowsK <= kMaxTileRowsOfX && kGemvRows <= kMaxTileRowsOfX,
              "the driver's output buffer holds kMaxTileRowsOfX rows");

}  // namespace

namespace cpu_quant {

Kernels avx512_vnni_kernels() {
  return {&tile_fn, kGemvRows, {kGemmRowsQ4, kGemmRowsQ4, kGemmRowsK, kGemmRowsK, kGemmRowsK, kGemmRowsQ0, kGemmRowsQ0},
          true, &interleaved_tiles<Vnni>, Vnni::kGemmRows};
}

}  // namespace cpu_quant

#pragma GCC pop_options
