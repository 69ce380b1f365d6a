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

template <typename T, typename W>
void rms_norm_rows(const T* x, int64_t ldx, const W* w, float w_offset, T* y, int64_t rows, int64_t H, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
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
}

template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t rows, int64_t I) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * 2 * I;
    const T* u = g + I;
    T* yr = y + r * I;
    for (int64_t i = 0; i < I; i += 8) {
      const __m256 gv = load8(g + i, I - i);
      const __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      store8(yr + i, _mm256_mul_ps(s, load8(u + i, I - i)), I - i);
    }
  }
}

// NeoX halves (x1 = x[:rd/2], x2 = x[rd/2:rd]) or GPT-J interleaved pairs; the other dims are copied.
template <typename T>
void rotary_rows(const T* x, int64_t xs0, int64_t xs1, const float* cs, const float* sn, T* y, int64_t Tn, int64_t H,
                 int64_t D, int64_t rd, bool interleaved) {
  const int64_t half = rd / 2;
  for (int64_t t = 0; t < Tn; ++t) {
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

// Row r (dim elements) widened to fp32 in the permuted order into d (width, zero-padded).
inline void widen_row(const c10::BFloat16* r, int64_t dim, int64_t width, float* d) {
  const __m256i odd = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  int64_t i = 0;
  for (; i + 16 <= dim; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i));
    _mm256_storeu_ps(d + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    _mm256_storeu_ps(d + i + 8, _mm256_castsi256_ps(_mm256_and_si256(v, odd)));
  }
  if (i < width) {
    std::memset(d + i, 0, static_cast<size_t>(width - i) * 4);
    for (int64_t t = i; t < dim; ++t) d[permuted(t)] = static_cast<float>(r[t]);
  }
}
inline void widen_row(const float* r, int64_t dim, int64_t width, float* d) {
  std::memset(d, 0, static_cast<size_t>(width) * 4);
  for (int64_t t = 0; t < dim; ++t) d[permuted(t)] = r[t];
}

// The cache rows of positions [pos, pos + n) (n <= 8, found through the block table), heads [h0, h1), widened
// into dst [h1 - h0][8][width] (missing keys zero).
template <typename T>
void widen_keys(const T* cache, int64_t s0, int64_t s1, const int64_t* table, int64_t bs, int64_t pos, int64_t n,
                int64_t h0, int64_t h1, int64_t dim, int64_t width, float* dst) {
  int64_t slots[kKeyBlock];
  for (int64_t j = 0; j < n; ++j) slots[j] = table[(pos + j) / bs] * bs + (pos + j) % bs;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t j = 0; j < kKeyBlock; ++j) {
      float* d = dst + ((h - h0) * kKeyBlock + j) * width;
      if (j < n)
        widen_row(cache + slots[j] * s0 + h * s1, dim, width, d);
      else
        std::memset(d, 0, static_cast<size_t>(width) * 4);
    }
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

// Chunk `c` of sequence `q` (its Hq query rows, pre-scaled into qf [Hq][width]) against its keys [k0, k1): the
// scores, a softmax within the chunk, and P @ V. Per query row: m (the chunk's largest score), l (the sum of
// exp(score - m)) and acc [Dv] (the sum of exp(score - m) V) into part [Hq][Dvp + 2]. Keys are read 8 slots at a
// time across all KV heads (the rows are contiguous in the cache); every sum runs over the keys in order.
template <typename T>
void attend_chunk(const float* qf, const T* kc, const T* vc, const int64_t* table, int64_t k0, int64_t k1,
                  int64_t h0, int64_t h1, const Params& p, float* part, std::vector<float>& scratch) {
  const int64_t G = p.G, Hq = p.Hq, Hk = h1 - h0, bs = p.block_size, q0 = h0 * G, q1 = h1 * G;
  const int64_t Dp = round16(p.D), Dvp = round16(p.Dv), n = k1 - k0, np = (n + 7) / 8 * 8;
  scratch.resize(static_cast<size_t>(Hq * np + Hk * kKeyBlock * std::max(Dp, Dvp)));
  float* sc = scratch.data();  // [Hq][np] scores, then exp(score - m)
  float* kw = sc + Hq * np;    // [Hk][8][Dp] widened keys (then values: [Hk][8][Dvp])
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    widen_keys(kc, p.k_s0, p.k_s1, table, bs, k0 + j0, std::min(kKeyBlock, n - j0), h0, h1, p.D, Dp, kw);
    for (int64_t hq = q0; hq < q1; ++hq) {
      const float* kh = kw + (hq / G - h0) * kKeyBlock * Dp;
      const float* qr = qf + hq * Dp;
      __m256 a[kKeyBlock];
#pragma GCC unroll 8
      for (int j = 0; j < kKeyBlock; ++j) a[j] = _mm256_setzero_ps();
      for (int64_t d = 0; d < Dp; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
#pragma GCC unroll 8
        for (int j = 0; j < kKeyBlock; ++j) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kh + j * Dp + d), a[j]);
      }
      _mm256_storeu_ps(sc + hq * np + j0, hsum8x8(a));
    }
  }
  // Softmax within the chunk (the keys past n are not scores: excluded).
  for (int64_t hq = q0; hq < q1; ++hq) {
    float* s = sc + hq * np;
    if (p.softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) s[j] = p.softcap * std::tanh(s[j] / p.softcap);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 tot = _mm256_setzero_ps();
    for (int64_t j = 0; j < np; j += 8) {
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)),
                                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv)), keep);
      tot = _mm256_add_ps(tot, e);
      _mm256_storeu_ps(s + j, e);
    }
    float* out = part + hq * (Dvp + 2);
    out[Dvp] = mx;
    out[Dvp + 1] = hsum8(tot);
    std::memset(out, 0, static_cast<size_t>(Dvp) * 4);
  }
  // P @ V: per query row, its Dv sums in registers (8 dims at a time, up to 64), the keys in order.
  for (int64_t j0 = 0; j0 < n; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, n - j0);
    widen_keys(vc, p.v_s0, p.v_s1, table, bs, k0 + j0, nk, h0, h1, p.Dv, Dvp, kw);
    for (int64_t hq = q0; hq < q1; ++hq) {
      const float* vh = kw + (hq / G - h0) * kKeyBlock * Dvp;
      const float* pr = sc + hq * np + j0;
      float* out = part + hq * (Dvp + 2);
      for (int64_t d0 = 0; d0 < Dvp; d0 += 64) {
        static constexpr PvFn kPv[9] = {nullptr, &pv_dims<1>, &pv_dims<2>, &pv_dims<3>, &pv_dims<4>,
                                        &pv_dims<5>, &pv_dims<6>, &pv_dims<7>, &pv_dims<8>};
        kPv[std::min<int64_t>(8, (Dvp - d0) / 8)](pr, nk, vh + d0, Dvp, out + d0);
      }
    }
  }
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                                  double scale, int64_t window, double softcap) {
  constexpr const char* op = "paged_attention_decode";
  const std::array<int64_t, 5> shape = check_attention(op, q, k_cache, v_cache, block_size);
  const int64_t S = shape[0], Hq = shape[1], D = shape[2], Hk = shape[3], Dv = shape[4];
  at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S, op,
              ": block_tables [S, W] and seq_lens [S] must match q's S");
  const int64_t width = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < S; ++i) check_table(op, tp + i * width, width, lp[i], block_size, k_cache.size(0), i);
  at::Tensor out = at::empty({S, Hq, Dv}, q.options());
  if (S == 0 || Hq == 0) return out;
  const Params p{Hq, Hk, D, Dv, Hq / Hk, block_size, window, q.stride(0), q.stride(1), k_cache.stride(0),
                 k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), static_cast<float>(scale),
                 static_cast<float>(softcap)};
  const int64_t Dp = round16(D), Dvp = round16(Dv);
  // Work items: (sequence, chunk of kChunk key positions). The chunks are fixed by position, so a row's result
  // depends only on its own query, keys and values: not on the batch or the thread count.
  std::vector<int64_t> first(S + 1, 0), kstart(S);
  for (int64_t i = 0; i < S; ++i) {
    kstart[i] = (window > 0 && lp[i] > window) ? lp[i] - window : 0;
    first[i + 1] = first[i] + (lp[i] - 1) / kChunk - kstart[i] / kChunk + 1;
  }
  const int64_t items = first[S];
  std::vector<float> qf(static_cast<size_t>(S * Hq * Dp), 0.0f);  // scaled queries, zero-padded
  std::vector<float> part(static_cast<size_t>(items * Hq * (Dvp + 2)));
  std::vector<int64_t> seq_of(items);
  for (int64_t i = 0; i < S; ++i)
    for (int64_t it = first[i]; it < first[i + 1]; ++it) seq_of[it] = i;
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op_) {
    for (int64_t i = 0; i < S; ++i)
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float* qr = qf.data() + (i * Hq + hq) * Dp;
        widen_row(qp + i * p.q_s0 + hq * p.q_s1, D, Dp, qr);
        for (int64_t d = 0; d < Dp; d += 8) _mm256_storeu_ps(qr + d, _mm256_mul_ps(_mm256_loadu_ps(qr + d),
                                                                                  _mm256_set1_ps(p.scale)));
      }
    // Few chunks (batch-1 decode of a short context): each also split into groups of KV heads, so that every
    // thread gets work. Heads are independent: the split changes no result.
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    int64_t split = 1;
    while (split < Hk && items * split < 2 * threads) ++split;
    while (Hk % split) ++split;
    const int64_t per = Hk / split;
    auto work = [&](int64_t i0, int64_t i1) {
      static thread_local std::vector<float> scratch;  // reused across calls
      for (int64_t w = i0; w < i1; ++w) {
        const int64_t it = w / split, h0 = (w % split) * per;
        const int64_t i = seq_of[it], c = kstart[i] / kChunk + (it - first[i]);
        const int64_t k0 = std::max(kstart[i], c * kChunk), k1 = std::min(lp[i], (c + 1) * kChunk);
        attend_chunk(qf.data() + i * Hq * Dp, kp, vp, tp + i * width, k0, k1, h0, h0 + per, p,
                     part.data() + it * Hq * (Dvp + 2), scratch);
      }
    };
    int64_t keys = 0;
    for (int64_t i = 0; i < S; ++i) keys += lp[i] - kstart[i];
    if (keys * Hk < 1024 || items * split == 1)
      work(0, items * split);
    else
      mistralrs_pool::parallel_for(0, items * split, 1, work);
    // Combine each row's chunks in order: out = sum_c exp(m_c - M) acc_c / sum_c exp(m_c - M) l_c.
    for (int64_t i = 0; i < S; ++i)
      for (int64_t hq = 0; hq < Hq; ++hq) {
        float M = -INFINITY;
        for (int64_t it = first[i]; it < first[i + 1]; ++it) M = std::max(M, part[(it * Hq + hq) * (Dvp + 2) + Dvp]);
        float acc[1024], L = 0.0f;
        float* o = Dvp <= 1024 ? acc : nullptr;
        std::vector<float> big;
        if (!o) {
          big.resize(Dvp);
          o = big.data();
        }
        std::memset(o, 0, static_cast<size_t>(Dvp) * 4);
        for (int64_t it = first[i]; it < first[i + 1]; ++it) {
          const float* pc = part.data() + (it * Hq + hq) * (Dvp + 2);
          const float f = first[i + 1] - first[i] == 1 ? 1.0f : std::exp(pc[Dvp] - M);
          L += f * pc[Dvp + 1];
          const __m256 fv = _mm256_set1_ps(f);
          for (int64_t d = 0; d < Dvp; d += 8)
            _mm256_storeu_ps(o + d, _mm256_fmadd_ps(fv, _mm256_loadu_ps(pc + d), _mm256_loadu_ps(o + d)));
        }
        const __m256 inv = _mm256_set1_ps(1.0f / L);
        for (int64_t d = 0; d < Dvp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(_mm256_loadu_ps(o + d), inv));
        auto* dst = op_ + i * Hq * Dv + hq * Dv;
        using OutT = std::remove_reference_t<decltype(*dst)>;
        for (int64_t d = 0; d < Dv; ++d) dst[d] = static_cast<OutT>(o[permuted(d)]);
      }
  };
  if (q.scalar_type() == at::kFloat)
    run(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), out.data_ptr<float>());
  else
    run(q.data_ptr<c10::BFloat16>(), k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(),
        out.data_ptr<c10::BFloat16>());
  return out;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool add_unit_offset=False) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, int rotary_dim=0, bool interleaved=False) -> Tensor");
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "int block_size, float scale, int window=0, float softcap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
  m.impl("paged_attention_decode", &paged_attention_decode);
}
