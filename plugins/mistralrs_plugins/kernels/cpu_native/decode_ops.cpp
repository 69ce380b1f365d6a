// Per-token ops of a decode step on AVX-512 CPUs, fp32 math on bf16 or fp32 tensors:
//
//   rms_norm(x, weight, eps, add_unit_offset)   y = x * rsqrt(mean(x^2) + eps) * w   (w + 1: Gemma)
//   silu_and_mul(x)                             y = silu(x[..., :I]) * x[..., I:]
//   rotary(x, cos, sin, rotary_dim, interleaved) rotary embedding of the first rotary_dim dims of each head
//   paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, softcap)
//   paged_attention_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, block_size, scale,
//                           window, softcap)
//
// Their torch references are in mistralrs_plugins/kernels/torch_ops.py; they compute in the same
// order (fp32, then one rounding to the output dtype) but may sum in another order.
//
// paged_attention_decode: one query token per sequence (the last of its seq_len tokens) attends to
// that sequence's keys in the paged cache, read in place through its block table (no gather copy).
// A work item is one sequence (or, at batch 1, a group of its KV heads); it computes the scores of each KV
// head's group of query heads (grouped-query attention without repeating K/V), a softmax and the weighted
// sum of V, all in fp32, walking the cache rows front to back.
//
// paged_attention_prefill: the new tokens of prefill chunks (already written to the cache), each one a row of
// the decode kernel with its own length: token j of sequence i's n new tokens is the last of the first
// seq_lens[i] - n + j + 1 keys, which is causal attention. Each query row is computed alone, by the decode
// arithmetic, so a token's attention does not depend on how its prompt was chunked or batched, nor on whether
// it was computed in prefill or decode. Up to 8 consecutive tokens of a sequence (bf16 caches, head dims that are
// multiples of 32, no sliding window cutting in) form one work item and share each load of K and V; every row
// still gets the arithmetic it gets alone. A sequence's K/V stay in L2/L3 while its items walk them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>
#include "../thread_pool.h"

namespace {

using mistralrs_native::reduce4;

// ---- loads and stores of 16 lanes as fp32 ----------------------------------------------------------

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));  // bf16 -> fp32 is exact
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  // vcvtneps2bf16 rounds to nearest even, as torch's float -> bfloat16 conversion.
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// exp(x) for fp32 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes expf
// coefficients, ~1 ulp), times 2^n. Inputs below -87.3 give 0 (softmax of masked / far-below-max scores).
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.7f);
  x = _mm512_max_ps(_mm512_min_ps(x, hi), lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 out = _mm512_scalef_ps(p, n);
  // exp(-87.3) is still a normal float; below it softmax weights are zero for every purpose.
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LE_OQ), out, _mm512_setzero_ps());
}

// Element-wise ops on up to this many elements run on the calling thread: a decode step's tensors (e.g.
// 16 x 2048) take microseconds, less than handing work to the other threads costs inside a step.
constexpr int64_t kSerialElements = 1 << 18;

// ---- rms_norm --------------------------------------------------------------------------------------

template <typename T, typename W>
void rms_norm_rows(const T* x, int64_t ldx, const W* w, float w_offset, T* y, int64_t rows, int64_t H,
                   float eps) {
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, H));
  mistralrs_pool::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * ldx;
      T* yr = y + r * H;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < H; i += 16) {
        const __m512 v = load16(xr + i, mask16(H - i));
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(acc) / static_cast<float>(H) + eps);
      const __m512 s = _mm512_set1_ps(inv), off = _mm512_set1_ps(w_offset);
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = mask16(H - i);
        store16(yr + i, _mm512_mul_ps(_mm512_mul_ps(load16(xr + i, m), s), _mm512_add_ps(load16(w + i, m), off)), m);
      }
    }
  });
}

// ---- silu_and_mul ----------------------------------------------------------------------------------

template <typename T>
void silu_mul_rows(const T* x, T* y, int64_t rows, int64_t I) {
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, I));
  mistralrs_pool::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * 2 * I;
      const T* u = g + I;
      T* yr = y + r * I;
      for (int64_t i = 0; i < I; i += 16) {
        const __mmask16 m = mask16(I - i);
        const __m512 gv = load16(g + i, m);
        // silu(g) = g / (1 + exp(-g)); the product with up rounds once to T.
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        store16(yr + i, _mm512_mul_ps(s, load16(u + i, m)), m);
      }
    }
  });
}

// ---- rotary -----------------------------------------------------------------------------------------

// y = x with its first rd dims of each head rotated by the token's angles (cos/sin [T, rd / 2], fp32):
// NeoX halves (x1 = x[:rd/2], x2 = x[rd/2:rd]) or GPT-J interleaved pairs; the other dims are copied.
template <typename T>
void rotary_rows(const T* x, int64_t xs0, int64_t xs1, const float* cs, const float* sn, T* y, int64_t Tn, int64_t H,
                 int64_t D, int64_t rd, bool interleaved) {
  const int64_t half = rd / 2;
  const int64_t grain = std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, D));
  mistralrs_pool::parallel_for(0, Tn * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / H, h = row % H;
      const T* xr = x + t * xs0 + h * xs1;
      T* yr = y + row * D;
      const float* c = cs + t * half;
      const float* s = sn + t * half;
      if (!interleaved) {
        for (int64_t i = 0; i < half; i += 16) {
          const __mmask16 m = mask16(half - i);
          const __m512 x1 = load16(xr + i, m), x2 = load16(xr + half + i, m);
          const __m512 cv = _mm512_maskz_loadu_ps(m, c + i), sv = _mm512_maskz_loadu_ps(m, s + i);
          store16(yr + i, _mm512_sub_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x2, sv)), m);
          store16(yr + half + i, _mm512_add_ps(_mm512_mul_ps(x2, cv), _mm512_mul_ps(x1, sv)), m);
        }
      } else {  // GPT-J pairs (GLM): rare, scalar
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = static_cast<float>(xr[2 * i]), x2 = static_cast<float>(xr[2 * i + 1]);
          yr[2 * i] = static_cast<T>(x1 * c[i] - x2 * s[i]);
          yr[2 * i + 1] = static_cast<T>(x2 * c[i] + x1 * s[i]);
        }
      }
      for (int64_t i = rd; i < D; i += 16) {
        const __mmask16 m = mask16(D - i);
        store16(yr + i, load16(xr + i, m), m);
      }
    }
  });
}

#include "decode_ops_api.h"

// ---- paged_attention_decode ------------------------------------------------------------------------

constexpr int kGroupBlock = 4;      // query heads per register block
constexpr int kKeyBlock = 4;        // keys per score block (reduced together)
constexpr int64_t kValueChunk = 8;  // keys per P @ V register pass
constexpr int64_t kSerialKeyHeads = 1024;  // (key, KV head) pairs below which one thread does all the work

struct DecodeParams {
  int64_t Hq, Hk, D, Dv, G, block_size, table_width, window;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, o_s0, o_s1;
  float scale, softcap;
};

struct DecodeScratch {
  std::vector<float> scores, qf, acc;  // [R, ld] probabilities, [R, D] scaled queries, [R, Dv] outputs
  std::vector<int64_t> slots;          // cache slot of each visible key
};

// Prefetch `bytes` bytes at each of `rows` row starts (the next block's segment of one head).
template <typename T>
inline void prefetch_segments(const T* const* rows, int nrows, int64_t bytes) {
  for (int t = 0; t < nrows; ++t)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(rows[t]) + b, _MM_HINT_T0);
}

// Scores of GB query rows (qf, stride D) against kKeyBlock keys (kr[t]) -> out[a * ld + t].
// GB is a compile-time constant so that the GB x 4 accumulators stay in registers.
template <int GB, typename T>
inline void qk_block(const float* qf, int64_t D, const T* const* kr, float* out, int64_t ld) {
  __m512 acc[GB][kKeyBlock];
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a)
#pragma GCC unroll 4
    for (int t = 0; t < kKeyBlock; ++t) acc[a][t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = mask16(D - d);
    __m512 kv[kKeyBlock];
#pragma GCC unroll 4
    for (int t = 0; t < kKeyBlock; ++t) kv[t] = load16(kr[t] + d, m);
#pragma GCC unroll 4
    for (int a = 0; a < GB; ++a) {
      const __m512 qv = _mm512_maskz_loadu_ps(m, qf + a * D + d);
#pragma GCC unroll 4
      for (int t = 0; t < kKeyBlock; ++t) acc[a][t] = _mm512_fmadd_ps(qv, kv[t], acc[a][t]);
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a) _mm_storeu_ps(out + a * ld, reduce4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]));
}

// acc_out[a, d0 : d0 + 16 NC] += sum_j P[a, j] V_j[d0 : ...] for GB rows and keys [c0, c1): the GB x NC
// accumulators live in registers for the whole chunk.
template <int GB, int NC, typename T>
inline void pv_block(const float* P, int64_t ld, const T* vc, const int64_t* slots, int64_t c0, int64_t c1,
                     int64_t v_off, int64_t v_s0, int64_t Dv, int64_t d0, float* acc_out) {
  __m512 acc[GB][NC];
  __mmask16 m[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; ++c) m[c] = mask16(Dv - d0 - 16 * c);
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[a][c] = _mm512_maskz_loadu_ps(m[c], acc_out + a * Dv + d0 + 16 * c);
  for (int64_t j = c0; j < c1; ++j) {
    const T* vr = vc + slots[j] * v_s0 + v_off + d0;
    __m512 vv[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) vv[c] = load16(vr + 16 * c, m[c]);
#pragma GCC unroll 4
    for (int a = 0; a < GB; ++a) {
      const __m512 pw = _mm512_set1_ps(P[a * ld + j]);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[a][c] = _mm512_fmadd_ps(pw, vv[c], acc[a][c]);
    }
  }
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) _mm512_mask_storeu_ps(acc_out + a * Dv + d0 + 16 * c, m[c], acc[a][c]);
}

// bf16 caches with D a multiple of 32: the same scores with vdpbf16ps on the raw bf16 query rows (row stride lq)
// and keys (bf16 x bf16 products are exact in fp32; 32 per instruction, no widening of K), times scale in fp32.
template <int GB>
inline void qk_block_bf16(const c10::BFloat16* q, int64_t lq, int64_t D, const c10::BFloat16* const* kr, float scale,
                          float* out, int64_t ld) {
  __m512 acc[GB][kKeyBlock];
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a)
#pragma GCC unroll 4
    for (int t = 0; t < kKeyBlock; ++t) acc[a][t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    __m512i kv[kKeyBlock];
#pragma GCC unroll 4
    for (int t = 0; t < kKeyBlock; ++t) kv[t] = _mm512_loadu_si512(kr[t] + d);
#pragma GCC unroll 4
    for (int a = 0; a < GB; ++a) {
      const __m512i qv = _mm512_loadu_si512(q + a * lq + d);
#pragma GCC unroll 4
      for (int t = 0; t < kKeyBlock; ++t) acc[a][t] = _mm512_dpbf16_ps(acc[a][t], (__m512bh)qv, (__m512bh)kv[t]);
    }
  }
  const __m128 sv = _mm_set1_ps(scale);
#pragma GCC unroll 4
  for (int a = 0; a < GB; ++a)
    _mm_storeu_ps(out + a * ld, _mm_mul_ps(reduce4(acc[a][0], acc[a][1], acc[a][2], acc[a][3]), sv));
}

using QkBf16Fn = void (*)(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16* const*, float, float*, int64_t);
constexpr QkBf16Fn kQkBf16[kGroupBlock + 1] = {nullptr, qk_block_bf16<1>, qk_block_bf16<2>, qk_block_bf16<3>,
                                               qk_block_bf16<4>};

template <typename T>
using QkFn = void (*)(const float*, int64_t, const T* const*, float*, int64_t);
template <typename T>
using PvFn = void (*)(const float*, int64_t, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                      int64_t, float*);

template <typename T>
struct AttnTables {
  static constexpr QkFn<T> qk[kGroupBlock + 1] = {nullptr, qk_block<1, T>, qk_block<2, T>, qk_block<3, T>,
                                                  qk_block<4, T>};
  static constexpr PvFn<T> pv[kGroupBlock + 1][5] = {
      {nullptr, nullptr, nullptr, nullptr, nullptr},
      {nullptr, pv_block<1, 1, T>, pv_block<1, 2, T>, pv_block<1, 3, T>, pv_block<1, 4, T>},
      {nullptr, pv_block<2, 1, T>, pv_block<2, 2, T>, pv_block<2, 3, T>, pv_block<2, 4, T>},
      {nullptr, pv_block<3, 1, T>, pv_block<3, 2, T>, pv_block<3, 3, T>, pv_block<3, 4, T>},
      {nullptr, pv_block<4, 1, T>, pv_block<4, 2, T>, pv_block<4, 3, T>, pv_block<4, 4, T>}};
};

// One sequence, KV heads [h0, h1), `ntok` consecutive tokens (the t-th sees the first seq_len + t keys; ntok > 1
// only for bf16 caches on the vdpbf16ps path without a window cutting in, see attend_rows): the scores of
// their query heads (R = ntok * (h1 - h0) * G rows) against the visible keys, a softmax per row, and P @ V.
// Keys are walked front to back in small blocks, every head (and token) of a block before the next block, so
// each slot's row (all KV heads side by side) is read once, while the next block's rows are prefetched. Every
// row's arithmetic is the one it gets alone (ntok = 1): its scores are per (row, key), its softmax runs over
// its own keys and its P @ V sums its own keys in order, so grouping tokens only shares the loads of K and V.
template <typename T>
void decode_heads(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t seq_len, int64_t ntok,
                  int64_t h0, int64_t h1, const DecodeParams& p, T* out, DecodeScratch& sc) {
  const int64_t last_len = seq_len + ntok - 1;
  const int64_t start = (p.window > 0 && last_len > p.window) ? last_len - p.window : 0;
  const int64_t n = last_len - start;  // keys of the last token; token t sees n - (ntok - 1 - t)
  const int64_t G = p.G, D = p.D, Dv = p.Dv, bs = p.block_size;
  const int64_t nh = h1 - h0, RT = nh * G, R = ntok * RT;
  auto tok = [&](int64_t r) { return r / RT; };
  auto n_of = [&](int64_t t) { return n - (ntok - 1 - t); };
  auto out_row = [&](int64_t r) { return out + tok(r) * p.o_s0 + (h0 * G + r % RT) * p.o_s1; };
  auto q_row = [&](int64_t r) { return q + tok(r) * p.q_s0 + (h0 * G + r % RT) * p.q_s1; };
  if (n <= 0) {  // nothing visible (cannot happen for a well-formed batch): zeros, as an empty softmax sum
    for (int64_t r = 0; r < R; ++r)
      for (int64_t d = 0; d < Dv; d += 16) store16(out_row(r) + d, _mm512_setzero_ps(), mask16(Dv - d));
    return;
  }
  // Row stride of the scores: padded off multiples of 1 KiB, so that the rows of a register block do not
  // all map to the same cache sets.
  int64_t ld = (n + 15) / 16 * 16;
  if (ld % 256 == 0) ld += 16;
  sc.scores.resize(static_cast<size_t>(R * ld));
  sc.qf.resize(static_cast<size_t>(R * D));
  sc.acc.assign(static_cast<size_t>(R * Dv), 0.0f);
  sc.slots.resize(static_cast<size_t>(n));
  float* scores = sc.scores.data();  // [R, ld]
  float* qf = sc.qf.data();
  float* acc_out = sc.acc.data();
  int64_t* slots = sc.slots.data();
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = start + j;
    slots[j] = table[pos / bs] * bs + pos % bs;
  }
  // bf16 with whole 32-element steps: scores with vdpbf16ps on the raw query rows, every key (the last n % 4 too,
  // in a block that repeats the last key) the same way.
  constexpr bool kBf16 = std::is_same_v<T, c10::BFloat16>;
  const bool dp = kBf16 && D % 32 == 0;
  for (int64_t r = 0; r < R && !dp; ++r) {
    const T* qr = q_row(r);
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = mask16(D - d);
      _mm512_mask_storeu_ps(qf + r * D + d, m, _mm512_mul_ps(load16(qr + d, m), _mm512_set1_ps(p.scale)));
    }
  }
  const int64_t k_seg = D * static_cast<int64_t>(sizeof(T)), v_seg = Dv * static_cast<int64_t>(sizeof(T));

  // Pass 1, scores: per block of kKeyBlock keys, every head and token, kGroupBlock query heads at a time.
  int64_t j = 0;
  if constexpr (kBf16) {
    for (; dp && j < n; j += kKeyBlock) {
      const int64_t nk = std::min<int64_t>(kKeyBlock, n - j);
      const bool has_next = j + 2 * kKeyBlock <= n;
      for (int64_t h = h0; h < h1; ++h) {
        const T* kr[kKeyBlock];
        for (int t = 0; t < kKeyBlock; ++t) kr[t] = kc + slots[j + std::min<int64_t>(t, nk - 1)] * p.k_s0 + h * p.k_s1;
        if (has_next) {
          const T* nxt[kKeyBlock];
          for (int t = 0; t < kKeyBlock; ++t) nxt[t] = kc + slots[j + kKeyBlock + t] * p.k_s0 + h * p.k_s1;
          prefetch_segments(nxt, kKeyBlock, k_seg);
        }
        for (int64_t tk = 0; tk < ntok; ++tk) {
          const int64_t rh = tk * RT + (h - h0) * G;
          for (int64_t g0 = 0; g0 < G; g0 += kGroupBlock) {
            const int64_t gb = std::min<int64_t>(kGroupBlock, G - g0);
            if (nk == kKeyBlock) {
              kQkBf16[gb](q_row(rh + g0), p.q_s1, D, kr, p.scale, scores + (rh + g0) * ld + j, ld);
            } else {  // the last n % 4 keys: into a scratch block, then the real ones
              float tmp[kGroupBlock * kKeyBlock];
              kQkBf16[gb](q_row(rh + g0), p.q_s1, D, kr, p.scale, tmp, kKeyBlock);
              for (int64_t a = 0; a < gb; ++a)
                for (int64_t t = 0; t < nk; ++t) scores[(rh + g0 + a) * ld + j + t] = tmp[a * kKeyBlock + t];
            }
          }
        }
      }
    }
  }
  for (; j + kKeyBlock <= n; j += kKeyBlock) {  // (ntok == 1 here)
    const bool has_next = j + 2 * kKeyBlock <= n;
    for (int64_t h = h0; h < h1; ++h) {
      const T* kr[kKeyBlock];
      for (int t = 0; t < kKeyBlock; ++t) kr[t] = kc + slots[j + t] * p.k_s0 + h * p.k_s1;
      if (has_next) {
        const T* nxt[kKeyBlock];
        for (int t = 0; t < kKeyBlock; ++t) nxt[t] = kc + slots[j + kKeyBlock + t] * p.k_s0 + h * p.k_s1;
        prefetch_segments(nxt, kKeyBlock, k_seg);
      }
      const int64_t rh = (h - h0) * G;  // the head's first row
      for (int64_t g0 = 0; g0 < G; g0 += kGroupBlock) {
        const int64_t gb = std::min<int64_t>(kGroupBlock, G - g0);
        AttnTables<T>::qk[gb](qf + (rh + g0) * D, D, kr, scores + (rh + g0) * ld + j, ld);
      }
    }
  }
  for (; j < n; ++j) {  // the last n % 4 keys, one at a time
    for (int64_t r = 0; r < R; ++r) {
      const T* kh = kc + slots[j] * p.k_s0 + (h0 + r / G) * p.k_s1;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = mask16(D - d);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qf + r * D + d), load16(kh + d, m), acc);
      }
      scores[r * ld + j] = _mm512_reduce_add_ps(acc);
    }
  }
  // Softmax per row over its own keys (softcap c first: c * tanh(s / c)).
  for (int64_t r = 0; r < R; ++r) {
    float* s = scores + r * ld;
    const int64_t nr = n_of(tok(r));
    if (p.softcap > 0.0f)
      for (int64_t jj = 0; jj < nr; ++jj) s[jj] = p.softcap * std::tanh(s[jj] / p.softcap);
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t jj = 0; jj < nr; jj += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, mask16(nr - jj), s + jj));
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t jj = 0; jj < nr; jj += 16) {
      const __mmask16 m = mask16(nr - jj);
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + jj), vmax));
      _mm512_mask_storeu_ps(s + jj, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t jj = 0; jj < nr; jj += 16) {
      const __mmask16 m = mask16(nr - jj);
      _mm512_mask_storeu_ps(s + jj, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + jj), inv));
    }
  }
  // Pass 2, out = P @ V: chunks of kValueChunk keys; per head and token, register blocks of kGroupBlock rows x 64
  // output dims over the chunk (cut at the token's last key), accumulated into the fp32 rows of acc_out.
  for (int64_t c0 = 0; c0 < n; c0 += kValueChunk) {
    const int64_t c1 = std::min(n, c0 + kValueChunk);
    const int64_t next = std::min(n, c1 + kValueChunk) - c1;
    for (int64_t h = h0; h < h1; ++h) {
      if (next > 0) {
        const T* nxt[kValueChunk];
        for (int64_t t = 0; t < next; ++t) nxt[t] = vc + slots[c1 + t] * p.v_s0 + h * p.v_s1;
        prefetch_segments(nxt, static_cast<int>(next), v_seg);
      }
      for (int64_t tk = 0; tk < ntok; ++tk) {
        const int64_t ct = std::min(c1, n_of(tk));
        if (ct <= c0) continue;
        const int64_t rh = tk * RT + (h - h0) * G;
        for (int64_t g0 = 0; g0 < G; g0 += kGroupBlock) {
          const int64_t gb = std::min<int64_t>(kGroupBlock, G - g0);
          for (int64_t d0 = 0; d0 < Dv; d0 += 64) {
            const int64_t nc = std::min<int64_t>(4, (Dv - d0 + 15) / 16);
            AttnTables<T>::pv[gb][nc](scores + (rh + g0) * ld, ld, vc, slots, c0, ct, h * p.v_s1, p.v_s0, Dv, d0,
                                      acc_out + (rh + g0) * Dv);
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < Dv; d += 16) {
      const __mmask16 m = mask16(Dv - d);
      store16(out_row(r) + d, _mm512_maskz_loadu_ps(m, acc_out + r * Dv + d), m);
    }
}

// Rows [row, row + ntok) of q: consecutive tokens of one sequence (one table, lengths lens[row] + t).
struct RowGroup {
  int64_t row, ntok;
};
constexpr int64_t kGroupTokens = 8;   // prefill tokens per work item (they share each load of K and V)
constexpr int64_t kMaxItemRows = 64;  // query rows per work item at most (scores: rows x keys fp32 in cache)

// The row groups of q (row s reads the block table at tables[s] and attends to its first lens[s] keys).
template <typename T>
void decode_all(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                const int64_t* const* tables, const int64_t* lens, const std::vector<RowGroup>& groups,
                const DecodeParams& p, at::Tensor& out) {
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t ng = static_cast<int64_t>(groups.size());
  int64_t maxtok = 1, keys = 0;
  for (const RowGroup& g : groups) {
    maxtok = std::max(maxtok, g.ntok);
    for (int64_t t = 0; t < g.ntok; ++t) {
      const int64_t len = lens[g.row] + t;
      keys += std::min(len, p.window > 0 ? p.window : len);
    }
  }
  // Work items: a row group with all its KV heads (whole cache rows), split into head groups when there are too
  // few groups to keep every thread busy (batch-1 decode) or too many rows for the scores to stay in cache.
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  int64_t split = 1;
  while (split < p.Hk && (ng * split < want || maxtok * p.G * (p.Hk / split) > kMaxItemRows)) ++split;
  while (p.Hk % split) ++split;  // equal head groups
  const int64_t per = p.Hk / split;
  // Little work (short contexts) runs on the calling thread: a parallel region inside a decode step costs
  // more than a few thousand keys take.
  const int64_t grain = keys * p.Hk <= kSerialKeyHeads ? ng * split : 1;
  mistralrs_pool::parallel_for(0, ng * split, grain, [&](int64_t begin, int64_t end) {
    static thread_local DecodeScratch scratch;  // reused across calls: no allocation (or page faults) per step
    for (int64_t item = begin; item < end; ++item) {
      const RowGroup& g = groups[item / split];
      const int64_t h0 = (item % split) * per;
      decode_heads<T>(qp + g.row * p.q_s0, kp, vp, tables[g.row], lens[g.row], g.ntok, h0, h0 + per, p,
                      op + g.row * p.o_s0, scratch);
    }
  });
}

// Runs S query rows (row s: table rows[s], lens[s] keys) in `groups` into a new [S, Hq, Dv] tensor.
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const std::array<int64_t, 5>& shape, const int64_t* const* rows, const int64_t* lens,
                       const std::vector<RowGroup>& groups, int64_t width, int64_t block_size, double scale,
                       int64_t sliding_window, double softcap) {
  const auto [S, Hq, D, Hk, Dv] = shape;
  at::Tensor out = at::empty({S, Hq, Dv}, q.options());
  if (S == 0 || Hq == 0) return out;
  DecodeParams p{Hq, Hk, D, Dv, Hq / Hk, block_size, width, sliding_window > 0 ? sliding_window : 0,
                 q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
                 v_cache.stride(1), out.stride(0), out.stride(1), static_cast<float>(scale),
                 softcap > 0 ? static_cast<float>(softcap) : 0.0f};
  if (q.scalar_type() == at::kFloat)
    decode_all<float>(q, k_cache, v_cache, rows, lens, groups, p, out);
  else
    decode_all<c10::BFloat16>(q, k_cache, v_cache, rows, lens, groups, p, out);
  return out;
}

at::Tensor paged_attention_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, int64_t block_size,
                                  double scale, int64_t sliding_window, double softcap) {
  constexpr const char* op = "paged_attention_decode";
  const auto shape = check_attention(op, q, k_cache, v_cache, block_size);
  const int64_t S = shape[0];
  at::Tensor tables = block_tables.to(at::kLong).contiguous();
  at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == S && lens.numel() == S, op,
              ": block_tables [S, W] and seq_lens [S] must match q's S");
  const int64_t width = tables.size(1);
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  std::vector<const int64_t*> rows(static_cast<size_t>(S));
  std::vector<RowGroup> groups(static_cast<size_t>(S));
  for (int64_t s = 0; s < S; ++s) {
    rows[s] = tp + s * width;
    groups[s] = {s, 1};
    check_table(op, rows[s], width, lp[s], block_size, k_cache.size(0), s);
  }
  return attend_rows(q, k_cache, v_cache, shape, rows.data(), lp, groups, width, block_size, scale, sliding_window,
                     softcap);
}

at::Tensor paged_attention_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& seq_lens,
                                   const at::Tensor& query_start_loc, int64_t block_size, double scale,
                                   int64_t sliding_window, double softcap) {
  constexpr const char* op = "paged_attention_prefill";
  const auto shape = check_attention(op, q, k_cache, v_cache, block_size);
  const int64_t T = shape[0];
  const PrefillArgs a = prefill_args(op, block_tables, seq_lens, query_start_loc, T, block_size, k_cache.size(0));
  const int64_t S = a.S, width = a.width;
  const int64_t *lp = a.lp, *tp = a.tp, *sp = a.sp;
  std::vector<const int64_t*> rows(static_cast<size_t>(T));
  std::vector<int64_t> row_lens(static_cast<size_t>(T));
  std::vector<RowGroup> groups;
  // Consecutive tokens share work items (and loads of K/V) where each row's arithmetic stays the one it gets
  // alone: bf16 on the vdpbf16ps path (its last partial key block is computed like a full one), every token of
  // the group seeing its sequence from the first key (no window cutting in).
  const bool shared = q.scalar_type() == at::kBFloat16 && shape[2] % 32 == 0;
  for (int64_t i = 0; i < S; ++i) {
    const int64_t n = sp[i + 1] - sp[i];
    if (n == 0) continue;
    for (int64_t j = 0; j < n; ++j) {
      rows[sp[i] + j] = tp + i * width;
      row_lens[sp[i] + j] = lp[i] - n + j + 1;
    }
    const int64_t step = shared && (sliding_window <= 0 || lp[i] <= sliding_window) ? kGroupTokens : 1;
    for (int64_t j = 0; j < n; j += step) groups.push_back({sp[i] + j, std::min(step, n - j)});
  }
  return attend_rows(q, k_cache, v_cache, shape, rows.data(), row_lens.data(), groups, width, block_size, scale,
                     sliding_window, softcap);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool add_unit_offset=False) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, int rotary_dim=0, bool interleaved=False) -> Tensor");
  m.def(
      "paged_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "int block_size, float scale, int sliding_window=0, float softcap=0.0) -> Tensor");
  m.def(
      "paged_attention_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor query_start_loc, int block_size, float scale, int sliding_window=0, float softcap=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
  m.impl("paged_attention_decode", &paged_attention_decode);
  m.impl("paged_attention_prefill", &paged_attention_prefill);
}
