// Per-token ops of a decode step on AVX2 CPUs (no AVX-512), fp32 math on bf16 or fp32 tensors: the same ops and
// signatures as decode_ops.cpp (its AVX-512 twin), registered below it for CPUs without avx512_bf16.
//
//   rms_norm(x, weight, eps, add_unit_offset)   y = x * rsqrt(mean(x^2) + eps) * w   (w + 1: Gemma)
//   silu_and_mul(x)                             y = silu(x[..., :I]) * x[..., I:]
//   rotary(x, cos, sin, rotary_dim, interleaved) rotary embedding of the first rotary_dim dims of each head
//   paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, softcap)
//
// paged_attention_decode reads K/V in place through the block tables (no gather copy), flash-decoding style: a
// work item is a chunk of kChunk key positions of one sequence (fixed by position) and all its KV heads (or a
// group of them, when there are few chunks), reading whole cache rows; per query row the chunk's scores (fp32
// dot products), a softmax within the chunk and P @ V in fp32, keys front to back; then each row's chunks are
// combined in order. A row's result depends only on its own query, keys and values: never on the batch, the
// head split or the thread count.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../thread_pool.h"

namespace {

// ---- 8 lanes as fp32 ---------------------------------------------------------------------------------

// The first n (<= 8) values at p as fp32, the rest zero.
inline __m256 load8(const float* p, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(p);
  alignas(32) float t[8] = {};
  std::memcpy(t, p, static_cast<size_t>(n) * 4);
  return _mm256_load_ps(t);
}
inline __m256 load8(const c10::BFloat16* p, int64_t n) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else {
    alignas(16) uint16_t t[8] = {};
    std::memcpy(t, p, static_cast<size_t>(n) * 2);
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  }
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 -> fp32 is exact
}
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8) return _mm256_storeu_ps(p, v);
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  std::memcpy(p, t, static_cast<size_t>(n) * 4);
}
inline void store8(c10::BFloat16* p, __m256 v, int64_t n) {
  // fp32 -> bf16 rounding to nearest even (NaN kept quiet), as torch's conversion
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  if (n >= 8) return _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  alignas(16) uint16_t t[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
  std::memcpy(p, t, static_cast<size_t>(n) * 2);
}

inline float hsum8(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

inline float hmax8(__m256 v) {
  __m128 r = _mm_max_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// exp(x) for fp32 lanes, as decode_ops.cpp's exp512: x = n ln2 + r, e^r by the Cephes expf polynomial, times 2^n
// (built in the exponent bits); inputs below -87.3 give 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.7f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n for n in [-126, 128]: split in two factors so that n = 128 (x near 88.7) does not overflow the exponent
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h1 = _mm256_srai_epi32(ni, 1), h2 = _mm256_sub_epi32(ni, h1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h1, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h2, _mm256_set1_epi32(127)), 23));
  return _mm256_andnot_ps(zero_mask, _mm256_mul_ps(_mm256_mul_ps(p, s1), s2));
}

// ---- rms_norm, silu_and_mul, rotary ---------------------------------------------------------------------
// As decode_ops.cpp's: rows in chunks of kSerialElements over the kernels' pool, so a decode step's tensors run on
// the calling thread and a prefill's are shared (a row's arithmetic is the same on any thread).

constexpr int64_t kSerialElements = 1 << 18;

template <typename T, typename W>
void rms_norm_rows(const T* x, int64_t ldx, const W* w, float w_offset, T* y, int64_t rows, int64_t H, float eps) {
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, H));
  mistralrs_pool::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * ldx;
      T* yr = y + r * H;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t i = 0; i < H; i += 8) {
        const __m256 v = load8(xr + i, H - i);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      const __m256 s = _mm256_set1_ps(1.0f / std::sqrt(hsum8(acc) / static_cast<float>(H) + eps));
      const __m256 off = _mm256_set1_ps(w_offset);
      for (int64_t i = 0; i < H; i += 8)
        store8(yr + i, _mm256_mul_ps(_mm256_mul_ps(load8(xr + i, H - i), s), _mm256_add_ps(load8(w + i, H - i), off)),
               H - i);
    }
  });
}

template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t rows, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, I));
  mistralrs_pool::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * I;
      const T* u = g + I;
      T* yr = y + r * I;
      for (int64_t i = 0; i < I; i += 8) {
        const __m256 gv = load8(g + i, I - i);
        const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
        store8(yr + i, _mm256_mul_ps(s, load8(u + i, I - i)), I - i);
      }
    }
  });
}

// NeoX halves (x1 = x[:rd/2], x2 = x[rd/2:rd]) or GPT-J interleaved pairs; the other dims are copied.
template <typename T>
void rotary_rows(const T* x, int64_t xs0, int64_t xs1, const float* cs, const float* sn, T* y, int64_t Tn, int64_t H,
                 int64_t D, int64_t rd, bool interleaved) {
  const int64_t half = rd / 2;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, H * D));
  mistralrs_pool::parallel_for(0, Tn, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + t * half;
      const float* s = sn + t * half;
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = x + t * xs0 + h * xs1;
        T* yr = y + (t * H + h) * D;
        if (!interleaved) {
          for (int64_t i = 0; i < half; i += 8) {
            const int64_t n = half - i;
            const __m256 x1 = load8(xr + i, n), x2 = load8(xr + half + i, n);
            const __m256 cv = load8(c + i, n), sv = load8(s + i, n);
            store8(yr + i, _mm256_sub_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)), n);
            store8(yr + half + i, _mm256_add_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)), n);
          }
        } else {
          for (int64_t i = 0; i < half; ++i) {
            const float a = static_cast<float>(xr[2 * i]), b = static_cast<float>(xr[2 * i + 1]);
            yr[2 * i] = static_cast<T>(a * c[i] - b * s[i]);
            yr[2 * i + 1] = static_cast<T>(b * c[i] + a * s[i]);
          }
        }
        for (int64_t i = rd; i < D; ++i) yr[i] = xr[i];
      }
    }
  });
}

#include "decode_ops_api.h"

// ---- paged_attention_decode ------------------------------------------------------------------------

struct Params {
  int64_t Hq, Hk, D, Dv, G, block_size, window;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1;
  float scale, softcap;
};

constexpr int64_t kChunk = 256;  // keys per work item; chunk c of a sequence holds its positions [c * kChunk, ..)
constexpr int64_t kKeyBlock = 8;  // keys widened together (one vector of scores per query row)
constexpr int64_t kSuperKeys = 64;  // keys widened per KV head before its query rows go by (a multiple of 8)
constexpr int64_t kGroupTokens = 8;  // prefill: consecutive query tokens per work item (they share the widened keys)

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// The 8 sums of a[0..7] (one vector per key), as one vector: lane j = the sum of a[j]'s lanes, by a fixed tree.
inline __m256 hsum8x8(const __m256* a) {
  const __m256 b0 = _mm256_hadd_ps(a[0], a[1]), b1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 b2 = _mm256_hadd_ps(a[4], a[5]), b3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 c0 = _mm256_hadd_ps(b0, b1), c1 = _mm256_hadd_ps(b2, b3);  // [k0..3 | k0..3], [k4..7 | k4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(c0, c1, 0x20), _mm256_permute2f128_ps(c0, c1, 0x31));
}

// Head dims in the kernel's order: each group of 16 as its 8 even elements, then its 8 odd ones (the order in
// which one 256-bit load of 16 bf16 values widens with a shift and a mask). Dot products do not care; outputs
// are put back in order at the end. Element i of a padded row of `width` (a multiple of 16) -> its position:
inline int64_t permuted(int64_t i) { return (i & ~int64_t(15)) + ((i & 1) << 3) + ((i & 15) >> 1); }

// Row r (dim elements) widened to fp32 in the permuted order into d (width, zero-padded), its groups of 8 values
// `stride` floats apart (8: one contiguous row).
inline void widen_row(const c10::BFloat16* r, int64_t dim, int64_t width, float* d, int64_t stride = 8) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i));
    _mm256_storeu_ps(d + i / 8 * stride, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    _mm256_storeu_ps(d + (i / 8 + 1) * stride, _mm256_castsi256_ps(_mm256_and_si256(v, odd)));
  }
  if (i < width) {
    for (int64_t c = i / 8; c < width / 8; ++c) _mm256_storeu_ps(d + c * stride, _mm256_setzero_ps());
    for (int64_t t = i; t < dim; ++t) d[permuted(t) / 8 * stride + permuted(t) % 8] = static_cast<float>(r[t]);
  }
}
inline void widen_row(const float* r, int64_t dim, int64_t width, float* d, int64_t stride = 8) {
  for (int64_t c = 0; c < width / 8; ++c) _mm256_storeu_ps(d + c * stride, _mm256_setzero_ps());
  for (int64_t t = 0; t < dim; ++t) d[permuted(t) / 8 * stride + permuted(t) % 8] = r[t];
}

// The cache rows of positions [pos, pos + n) (n <= 8, found through the block table), heads [h0, h1), widened
// (missing keys zero) into dst, per head (head_stride floats apart) 8 rows of `width`: row-major [8][width]
// (values), or with `interleave` [width / 8][8 keys][8] (keys: the 8 keys' groups of 8 dims next to each other, so
// that the dot products walk one pointer with constant offsets).
template <typename T>
void widen_keys(const T* cache, int64_t s0, int64_t s1, const int64_t* table, int64_t bs, int64_t pos, int64_t n,
                int64_t h0, int64_t h1, int64_t dim, int64_t width, float* dst, bool interleave, int64_t head_stride) {
  int64_t slots[kKeyBlock];
  for (int64_t j = 0; j < n; ++j) slots[j] = table[(pos + j) / bs] * bs + (pos + j) % bs;
  const int64_t stride = interleave ? 8 * kKeyBlock : 8;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t j = 0; j < kKeyBlock; ++j) {
      float* d = dst + (h - h0) * head_stride + (interleave ? 8 * j : j * width);
      if (j < n) {
        widen_row(cache + slots[j] * s0 + h * s1, dim, width, d, stride);
      } else {
        for (int64_t c = 0; c < width / 8; ++c) _mm256_storeu_ps(d + c * stride, _mm256_setzero_ps());
      }
    }
}

// The largest of s[a0 .. a1) (a1 > a0; exact, so the order does not matter).
inline float max_of(const float* s, int64_t a0, int64_t a1) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = a0;
  for (; j + 8 <= a1; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  float mx = hmax8(m);
  for (; j < a1; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// out[0 : 8 NV] += sum_j p[j] v[j * ld + 0 : 8 NV] over the n keys in order (NV vectors in registers).
template <int NV>
void pv_dims(const float* p, int64_t n, const float* v, int64_t ld, float* out) {
  __m256 a[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) a[i] = _mm256_loadu_ps(out + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pw = _mm256_set1_ps(p[j]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) a[i] = _mm256_fmadd_ps(pw, _mm256_loadu_ps(v + j * ld + 8 * i), a[i]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + 8 * i, a[i]);
}
using PvFn = void (*)(const float*, int64_t, const float*, int64_t, float*);

// pv_dims for two rows (weights p0, p1; outputs o0, o1) over the same values: each loaded vector of V serves both
// rows (the loads, not the fmadds, bound pv_dims), each output's chain the same as pv_dims's.
template <int NV>
void pv_dims2(const float* p0, const float* p1, int64_t n, const float* v, int64_t ld, float* o0, float* o1) {
  __m256 a[NV], b[NV];
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
    a[i] = _mm256_loadu_ps(o0 + 8 * i);
    b[i] = _mm256_loadu_ps(o1 + 8 * i);
  }
  for (int64_t j = 0; j < n; ++j) {
    const __m256 w0 = _mm256_set1_ps(p0[j]), w1 = _mm256_set1_ps(p1[j]);
#pragma GCC unroll 8
    for (int i = 0; i < NV; ++i) {
      const __m256 vv = _mm256_loadu_ps(v + j * ld + 8 * i);
      a[i] = _mm256_fmadd_ps(w0, vv, a[i]);
      b[i] = _mm256_fmadd_ps(w1, vv, b[i]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < NV; ++i) {
    _mm256_storeu_ps(o0 + 8 * i, a[i]);
    _mm256_storeu_ps(o1 + 8 * i, b[i]);
  }
}
using Pv2Fn = void (*)(const float*, const float*, int64_t, const float*, int64_t, float*, float*);

// The rows of one work item: R consecutive query tokens of a sequence (one block table), each with Hq heads
// (pre-scaled, permuted, zero-padded into qf [R][Hq][Dp]), and for each token the key positions it attends to
// within the item's chunk: [ka[r], ke[r]) inside [k0, k1) (empty: the token does not reach this chunk).
struct Rows {
  const float* qf;
  int64_t R;
  const int64_t* ka;
  const int64_t* ke;
};

// Chunk [k0, k1) of a sequence (k0 a multiple of 8) against its rows: per (token, query head) the chunk's scores
// (fp32 dot products), a softmax within the chunk and P @ V. Per row: m (its largest score here), l (the sum of
// exp(score - m): 8 lanes by key position mod 8, then a fixed tree) and acc [Dv] (the sum of exp(score - m) V, in
// key order) into part [R][Hq][Dvp + 2]. Keys (then values) are widened kSuperKeys at a time for all the item's KV
// heads (16 KB a head at head dim 64: it stays in L1 while the head's query rows go by), so that P @ V keeps its
// sums in registers across a super-block and the cache is read row by row.
// A row computes the 8-key blocks that hold some key of its range [ka, ke), no others. Its arithmetic depends
// only on its own query and key range: keys outside its range get exactly zero weight, whatever else the item
// holds, so a token computes alone (decode) what it computes among the others of its prompt (prefill).
template <typename T>
void attend_chunk(const Rows& rows, const T* kc, const T* vc, const int64_t* table, int64_t k0, int64_t k1,
                  int64_t h0, int64_t h1, const Params& p, float* part, std::vector<float>& scratch) {
  const int64_t G = p.G, Hq = p.Hq, bs = p.block_size, R = rows.R;
  const int64_t Dp = round16(p.D), Dvp = round16(p.Dv), n = k1 - k0, np = (n + 7) / 8 * 8;
  const int64_t hs = kSuperKeys * std::max(Dp, Dvp);  // floats per KV head of widened keys or values
  scratch.resize(static_cast<size_t>(R * Hq * np + (h1 - h0) * hs));
  float* sc = scratch.data();      // [R][Hq][np] scores, then weights
  float* kw = sc + R * Hq * np;    // per head: [kSuperKeys / 8][Dp / 8][8][8] widened keys (values: [kSuperKeys][Dvp])
  // The keys [b0, b1) (relative to k0, multiples of 8 but for b1 = n) of the blocks row r computes, within [s0, s1).
  auto blocks = [&](int64_t r, int64_t s0, int64_t s1, int64_t& b0, int64_t& b1) {
    b0 = std::max(s0, (rows.ka[r] - k0) / kKeyBlock * kKeyBlock);
    b1 = std::min(s1, (rows.ke[r] - k0 + kKeyBlock - 1) / kKeyBlock * kKeyBlock);
    if (rows.ke[r] <= rows.ka[r]) b1 = b0;  // not reached
  };
  // The cache rows of keys [s0, s1) (a super-block), all the item's KV heads, widened into kw.
  auto widen_super = [&](const T* cache, int64_t st0, int64_t st1, int64_t dim, int64_t width, int64_t s0, int64_t s1,
                         bool keys) {
    for (int64_t j0 = s0; j0 < s1; j0 += kKeyBlock)
      widen_keys(cache, st0, st1, table, bs, k0 + j0, std::min(kKeyBlock, s1 - j0), h0, h1, dim, width,
                 kw + (j0 - s0) * width, keys, hs);
  };
  // Scores: the keys of a super-block widened for all the item's KV heads (read from the cache row by row), then
  // each head's query rows.
  for (int64_t s0 = 0; s0 < n; s0 += kSuperKeys) {
    const int64_t s1 = std::min(n, s0 + kSuperKeys);
    widen_super(kc, p.k_s0, p.k_s1, p.D, Dp, s0, s1, true);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t r = 0; r < R; ++r) {
        int64_t b0, b1;
        blocks(r, s0, s1, b0, b1);
        for (int64_t hq = h * G; hq < (h + 1) * G; ++hq) {
          const float* qr = rows.qf + (r * Hq + hq) * Dp;
          for (int64_t j0 = b0; j0 < b1; j0 += kKeyBlock) {
            const float* kh = kw + (h - h0) * hs + (j0 - s0) * Dp;
            __m256 a[kKeyBlock];
#pragma GCC unroll 8
            for (int j = 0; j < kKeyBlock; ++j) a[j] = _mm256_setzero_ps();
            for (int64_t d = 0; d < Dp; d += 8) {
              const __m256 qv = _mm256_loadu_ps(qr + d);
              const float* kd = kh + d * kKeyBlock;
#pragma GCC unroll 8
              for (int j = 0; j < kKeyBlock; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kd + 8 * j), a[j]);
            }
            _mm256_storeu_ps(sc + (r * Hq + hq) * np + j0, hsum8x8(a));
          }
        }
      }
    }
  }
  // Softmax within the chunk over each row's own keys (every other weight exactly 0).
  for (int64_t r = 0; r < R; ++r) {
    const int64_t a0 = std::max<int64_t>(0, rows.ka[r] - k0), a1 = std::min(n, rows.ke[r] - k0);
    for (int64_t hq = h0 * G; hq < h1 * G; ++hq) {
      float* s = sc + (r * Hq + hq) * np;
      float* out = part + (r * Hq + hq) * (Dvp + 2);
      std::memset(out, 0, static_cast<size_t>(Dvp + 2) * 4);
      if (a1 <= a0) continue;
      if (p.softcap > 0.0f)
        for (int64_t j = a0; j < a1; ++j) s[j] = p.softcap * std::tanh(s[j] / p.softcap);
      const float mx = max_of(s, a0, a1);
      const __m256 mv = _mm256_set1_ps(mx);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      __m256 tot = _mm256_setzero_ps();  // lane = key position mod 8 (k0 is a multiple of 8): the same sums
      const int64_t e0 = a0 / 8 * 8, e1 = (a1 + 7) / 8 * 8;  // whatever else the item holds
      for (int64_t j = e0; j < e1; j += 8) {
        const __m256i idx = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(j)));
        const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(a0)), idx),
                                               _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(a1)), idx));
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)), _mm256_castsi256_ps(in));
        tot = _mm256_add_ps(tot, e);
        _mm256_storeu_ps(s + j, e);
      }
      out[Dvp] = mx;
      out[Dvp + 1] = hsum8(tot);
    }
  }
  // P @ V: per row (two query heads at a time), its sums in registers across a super-block's keys, in order.
  for (int64_t s0 = 0; s0 < n; s0 += kSuperKeys) {
    const int64_t s1 = std::min(n, s0 + kSuperKeys);
    widen_super(vc, p.v_s0, p.v_s1, p.Dv, Dvp, s0, s1, false);
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t r = 0; r < R; ++r) {
        int64_t b0, b1;
        blocks(r, s0, s1, b0, b1);
        if (b1 <= b0) continue;
        const float* vh = kw + (h - h0) * hs + (b0 - s0) * Dvp;
        for (int64_t hq = h * G; hq < (h + 1) * G;) {
          const float* pr = sc + (r * Hq + hq) * np + b0;
          float* out = part + (r * Hq + hq) * (Dvp + 2);
          if (hq + 1 < (h + 1) * G) {  // two query heads: each loaded vector of V serves both
            for (int64_t d0 = 0; d0 < Dvp; d0 += 32) {
              static constexpr Pv2Fn kPv2[5] = {nullptr, &pv_dims2<1>, &pv_dims2<2>, &pv_dims2<3>, &pv_dims2<4>};
              kPv2[std::min<int64_t>(4, (Dvp - d0) / 8)](pr, pr + np, b1 - b0, vh + d0, Dvp, out + d0,
                                                         out + Dvp + 2 + d0);
            }
            hq += 2;
            continue;
          }
          for (int64_t d0 = 0; d0 < Dvp; d0 += 64) {
            static constexpr PvFn kPv[9] = {nullptr, &pv_dims<1>, &pv_dims<2>, &pv_dims<3>, &pv_dims<4>,
                                            &pv_dims<5>, &pv_dims<6>, &pv_dims<7>, &pv_dims<8>};
            kPv[std::min<int64_t>(8, (Dvp - d0) / 8)](pr, b1 - b0, vh + d0, Dvp, out + d0);
          }
          ++hq;
        }
      }
    }
  }
}

// A group of query tokens: rows [row, row + ntok) of q, consecutive tokens of sequence `seq`; token t attends to
// key positions [max(0, len - window), len) with len = lens[row + t].
struct TokenGroup {
  int64_t seq, row, ntok, c0, c1;  // the chunks [c0, c1) some token of the group reaches
};

// Runs the query rows (row s of q: table of its sequence, lens[s] keys) in `groups` into a new [T, Hq, Dv] tensor.
at::Tensor attend_groups(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const std::array<int64_t, 5>& shape, const int64_t* tables, int64_t width, const int64_t* lens,
                         std::vector<TokenGroup>& groups, int64_t block_size, double scale, int64_t window,
                         double softcap) {
  const auto [T, Hq, D, Hk, Dv] = shape;
  at::Tensor out = at::empty({T, Hq, Dv}, q.options());
  if (T == 0 || Hq == 0 || groups.empty()) return out;
  const Params p{Hq, Hk, D, Dv, Hq / Hk, block_size, window, q.stride(0), q.stride(1), k_cache.stride(0),
                 k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), static_cast<float>(scale),
                 static_cast<float>(softcap)};
  const int64_t Dp = round16(D), Dvp = round16(Dv), row_floats = Hq * (Dvp + 2);
  auto start_of = [&](int64_t len) { return window > 0 && len > window ? len - window : 0; };
  // Work items: (group, chunk), chunks fixed by key position, so a row's result depends only on its own query,
  // keys and values: not on the batch, the grouping, the head split or the thread count.
  std::vector<int64_t> first(groups.size() + 1, 0), base(groups.size() + 1, 0);  // items; part floats
  for (size_t g = 0; g < groups.size(); ++g) {
    first[g + 1] = first[g] + groups[g].c1 - groups[g].c0;
    base[g + 1] = base[g] + (groups[g].c1 - groups[g].c0) * groups[g].ntok * row_floats;
  }
  const int64_t items = first.back();
  std::vector<int64_t> group_of(static_cast<size_t>(items));
  for (size_t g = 0; g < groups.size(); ++g)
    for (int64_t it = first[g]; it < first[g + 1]; ++it) group_of[it] = static_cast<int64_t>(g);
  std::vector<float> qf(static_cast<size_t>(T * Hq * Dp));
  // Per item, its tokens' rows: [ntok][Hq][Dvp + 2] (acc, m, l).
  std::vector<float> part(static_cast<size_t>(base.back()));
  auto item_part = [&](int64_t gi, int64_t c) {
    return part.data() + base[gi] + (c - groups[gi].c0) * groups[gi].ntok * row_floats;
  };
  // Per-token work before and after the items (query widening, the chunks' combination) runs on the pool too
  // when there are many tokens (a prefill): serial, it was ~15% of a 512-token prompt's time on 2 threads.
  auto per_token = [&](auto&& fn) {
    if (T >= 16)
      mistralrs_pool::parallel_for(0, T, 1, fn);
    else
      fn(0, T);
  };
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op_) {
    per_token([&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t hq = 0; hq < Hq; ++hq) {
          float* qr = qf.data() + (t * Hq + hq) * Dp;
          widen_row(qp + t * p.q_s0 + hq * p.q_s1, D, Dp, qr);
          for (int64_t d = 0; d < Dp; d += 8)
            _mm256_storeu_ps(qr + d, _mm256_mul_ps(_mm256_loadu_ps(qr + d), _mm256_set1_ps(p.scale)));
        }
    });
    // Few items (batch-1 decode of a short context): each also split into groups of KV heads, so that every
    // thread gets work. Heads are independent: the split changes no result.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t split = 1;
    while (split < Hk && items * split < 2 * threads) ++split;
    while (Hk % split) ++split;
    const int64_t per = Hk / split;
    auto work = [&](int64_t i0, int64_t i1) {
      static thread_local std::vector<float> scratch;  // reused across calls
      for (int64_t w = i0; w < i1; ++w) {
        const int64_t it = w / split, h0 = (w % split) * per, gi = group_of[it];
        const TokenGroup& g = groups[gi];
        const int64_t c = g.c0 + (it - first[gi]);
        int64_t ka[kGroupTokens], ke[kGroupTokens], k1 = c * kChunk;
        for (int64_t t = 0; t < g.ntok; ++t) {
          const int64_t len = lens[g.row + t];
          ka[t] = std::max(start_of(len), c * kChunk);
          ke[t] = std::min(len, (c + 1) * kChunk);
          if (ke[t] <= ka[t]) ka[t] = ke[t] = c * kChunk;  // not reached
          k1 = std::max(k1, ke[t]);
        }
        int64_t k0 = k1;
        for (int64_t t = 0; t < g.ntok; ++t)
          if (ke[t] > ka[t]) k0 = std::min(k0, ka[t]);
        k0 = k0 / kKeyBlock * kKeyBlock;  // key blocks (and softmax lanes) at positions that are multiples of 8
        const Rows rows{qf.data() + g.row * Hq * Dp, g.ntok, ka, ke};
        attend_chunk(rows, kp, vp, tables + g.seq * width, k0, k1, h0, h0 + per, p, item_part(gi, c), scratch);
      }
    };
    int64_t keys = 0;
    for (int64_t t = 0; t < T; ++t) keys += lens[t] - start_of(lens[t]);
    if (keys * Hk < 1024 || items * split == 1)
      work(0, items * split);
    else
      mistralrs_pool::parallel_for(0, items * split, 1, work);
    // Combine each row's chunks in order: out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c.
    std::vector<int64_t> group_at(static_cast<size_t>(T));  // the group of each query row
    for (size_t gi = 0; gi < groups.size(); ++gi)
      for (int64_t t = 0; t < groups[gi].ntok; ++t) group_at[groups[gi].row + t] = static_cast<int64_t>(gi);
    per_token([&](int64_t r0, int64_t r1) {
      std::vector<float> o(static_cast<size_t>(Dvp));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t gi = group_at[r];
        const TokenGroup& g = groups[gi];
        const int64_t t = r - g.row;
        const int64_t len = lens[g.row + t];
        const int64_t ca = start_of(len) / kChunk, cb = (len - 1) / kChunk + 1;  // the token's chunks
        for (int64_t hq = 0; hq < Hq; ++hq) {
          auto at_chunk = [&](int64_t c) { return item_part(static_cast<int64_t>(gi), c) + (t * Hq + hq) * (Dvp + 2); };
          float M = -INFINITY, L = 0.0f;
          for (int64_t c = ca; c < cb; ++c) M = std::max(M, at_chunk(c)[Dvp]);
          std::fill(o.begin(), o.end(), 0.0f);
          for (int64_t c = ca; c < cb; ++c) {
            const float* pc = at_chunk(c);
            const float f = cb - ca == 1 ? 1.0f : std::exp(pc[Dvp] - M);
            L += f * pc[Dvp + 1];
            const __m256 fv = _mm256_set1_ps(f);
            for (int64_t d = 0; d < Dvp; d += 8)
              _mm256_storeu_ps(o.data() + d, _mm256_fmadd_ps(fv, _mm256_loadu_ps(pc + d), _mm256_loadu_ps(o.data() + d)));
          }
          const float inv = 1.0f / L;
          auto* dst = op_ + (g.row + t) * Hq * Dv + hq * Dv;
          using OutT = std::remove_reference_t<decltype(*dst)>;
          const __m256 iv = _mm256_set1_ps(inv);
          int64_t d = 0;
          for (; d + 16 <= Dv; d += 16) {  // back in order: each 16 dims are 8 even ones, then 8 odd ones
            const __m256 ev = _mm256_loadu_ps(o.data() + d), od = _mm256_loadu_ps(o.data() + d + 8);
            const __m256 lo = _mm256_unpacklo_ps(ev, od), hi = _mm256_unpackhi_ps(ev, od);
            store8(dst + d, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x20), iv), 8);
            store8(dst + d + 8, _mm256_mul_ps(_mm256_permute2f128_ps(lo, hi, 0x31), iv), 8);
          }
          for (; d < Dv; ++d) dst[d] = static_cast<OutT>(o[permuted(d)] * inv);
        }
      }
    });
  };
  if (q.scalar_type() == at::kFloat)
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>());
  else
    run(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
        out.data_ptr<c10::BFloat16>());
  return out;
}

// The chunks [c0, c1) tokens with key counts lens[0 .. ntok) reach.
void group_chunks(TokenGroup& g, const int64_t* lens, int64_t window) {
  g.c0 = INT64_MAX;
  g.c1 = 0;
  for (int64_t t = 0; t < g.ntok; ++t) {
    const int64_t len = lens[g.row + t], start = window > 0 && len > window ? len - window : 0;
    g.c0 = std::min(g.c0, start / kChunk);
    g.c1 = std::max(g.c1, (len - 1) / kChunk + 1);
  }
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                                  double scale, int64_t window, double softcap) {
  constexpr const char* op = "paged_attention_decode";
  const std::array<int64_t, 5> shape = check_attention(op, q, k_cache, v_cache, block_size);
  const int64_t S = shape[0];
  at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S, op,
              ": block_tables [S, W] and seq_lens [S] must match q's S");
  const int64_t width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  std::vector<TokenGroup> groups(static_cast<size_t>(S));
  for (int64_t i = 0; i < S; ++i) {
    check_table(op, tp + i * width, width, lp[i], block_size, k_cache.size(0), i);
    groups[i] = {i, i, 1, 0, 0};
    group_chunks(groups[i], lp, window);
  }
  return attend_groups(q, k_cache, v_cache, shape, tp, width, lp, groups, block_size, scale, window, softcap);
}

// The new tokens of prefill chunks (already written to the cache): token j of sequence i's n new tokens is the
// last of the first seq_lens[i] - n + j + 1 keys (causal attention), computed as decode computes that row.
at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_start_loc, int64_t block_size, double scale,
                                   int64_t window, double softcap) {
  constexpr const char* op = "paged_attention_prefill";
  const std::array<int64_t, 5> shape = check_attention(op, q, k_cache, v_cache, block_size);
  const int64_t T = shape[0];
  const PrefillArgs a = prefill_args(op, block_tables, seq_lens, query_start_loc, T, block_size, k_cache.size(0));
  const int64_t *lp = a.lp, *sp = a.sp;
  std::vector<int64_t> row_lens(static_cast<size_t>(T));
  std::vector<TokenGroup> groups;
  for (int64_t i = 0; i < a.S; ++i) {
    const int64_t n = sp[i + 1] - sp[i];
    if (n == 0) continue;
    for (int64_t j = 0; j < n; ++j) row_lens[sp[i] + j] = lp[i] - n + j + 1;
    for (int64_t j = 0; j < n; j += kGroupTokens) groups.push_back({i, sp[i] + j, std::min(kGroupTokens, n - j), 0, 0});
  }
  for (TokenGroup& g : groups) group_chunks(g, row_lens.data(), window);
  return attend_groups(q, k_cache, v_cache, shape, a.tp, a.width, row_lens.data(), groups, block_size, scale, window,
                       softcap);
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool add_unit_offset=False) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, int rotary_dim=0, bool interleaved=False) -> Tensor");
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "int block_size, float scale, int window=0, float softcap=0.0) -> Tensor");
  m.def(
      "paged_attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, int block_size, float scale, int window=0, float softcap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
  m.impl("paged_attention_decode", &paged_attention_decode);
  m.impl("paged_attention_prefill", &paged_attention_prefill);
}
