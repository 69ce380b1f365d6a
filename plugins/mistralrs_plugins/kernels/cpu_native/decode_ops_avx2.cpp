// Per-token ops of a decode step on AVX2 CPUs (no AVX-512), fp32 math on bf16 or fp32 tensors: the same ops and
// signatures as decode_ops.cpp (its AVX-512 twin), registered below it for CPUs without avx512_bf16.
//
//   rms_norm(x, weight, eps, add_unit_offset)   y = x * rsqrt(mean(x^2) + eps) * w   (w + 1: Gemma)
//   silu_and_mul(x)                             y = silu(x[..., :I]) * x[..., I:]
//   rotary(x, cos, sin, rotary_dim, interleaved) rotary embedding of the first rotary_dim dims of each head
//   paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale, window, softcap)
//
// paged_attention_decode reads K/V in place through the block tables (no gather copy): a work item is one
// (sequence, KV head): the scores of that head's query heads against the visible keys (fp32 dot products),
// a softmax per row, then P @ V accumulated in fp32, keys front to back. A row's result depends only on its
// own query, keys and values: never on the batch or the thread count. Without the torch reference's gather,
// masks and dispatches, one layer's decode attention takes microseconds instead of ~0.4 ms.

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

// Scores of GB query rows (qf, stride D) against one key row kr -> out[a * ld] (times nothing: qf is pre-scaled).
// GB is a compile-time constant so that the accumulators stay in registers.
template <int GB, typename T>
void qk_rows(const float* qf, int64_t D, const T* kr, float* out, int64_t ld, float softcap) {
  __m256 a[GB];
  for (int t = 0; t < GB; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 kv = load8(kr + d, D - d);
    for (int t = 0; t < GB; ++t) a[t] = _mm256_fmadd_ps(load8(qf + t * D + d, D - d), kv, a[t]);
  }
  for (int t = 0; t < GB; ++t) {
    float s = hsum8(a[t]);
    if (softcap > 0.0f) s = softcap * std::tanh(s / softcap);
    out[t * ld] = s;
  }
}

// acc[a * Dv + 0 : 16] = sum_j P[a * n + j] V_j[0 : 16] for GB rows (V_j at v + slots[j] * vs0; `left` dims
// of V remain from there): each 16 dims of a value row are widened once for all the head's query rows.
template <int GB, typename T>
void pv_rows(const float* P, int64_t n, const T* v, const int64_t* slots, int64_t vs0, int64_t left, float* acc,
             int64_t Dv) {
  __m256 a[GB][2];
  for (int r = 0; r < GB; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = v + slots[j] * vs0;
    const __m256 v0 = load8(vr, left), v1 = left > 8 ? load8(vr + 8, left - 8) : _mm256_setzero_ps();
    for (int r = 0; r < GB; ++r) {
      const __m256 pw = _mm256_set1_ps(P[r * n + j]);
      a[r][0] = _mm256_fmadd_ps(pw, v0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(pw, v1, a[r][1]);
    }
  }
  for (int r = 0; r < GB; ++r) {
    store8(acc + r * Dv, a[r][0], left);
    if (left > 8) store8(acc + r * Dv + 8, a[r][1], left - 8);
  }
}

// One sequence and KV head: its G query rows against keys [start, len) of the sequence, written to out [G, Dv].
template <typename T>
void attend_head(const T* q, const T* kc, const T* vc, const int64_t* table, int64_t len, int64_t h,
                 const Params& p, T* out, std::vector<float>& scratch, std::vector<int64_t>& slots) {
  const int64_t G = p.G, D = p.D, Dv = p.Dv, bs = p.block_size;
  const int64_t start = (p.window > 0 && len > p.window) ? len - p.window : 0;
  const int64_t n = len - start;
  scratch.resize(static_cast<size_t>(G * (D + n + Dv)));
  slots.resize(static_cast<size_t>(n));
  float* qf = scratch.data();      // [G, D] scaled queries
  float* sc = qf + G * D;          // [G, n] scores, then probabilities
  float* acc = sc + G * n;         // [G, Dv]
  for (int64_t j = 0; j < n; ++j) {
    const int64_t pos = start + j;
    slots[j] = table[pos / bs] * bs + pos % bs;
  }
  for (int64_t g = 0; g < G; ++g) {
    const T* qr = q + (h * G + g) * p.q_s1;
    for (int64_t d = 0; d < D; d += 8) store8(qf + g * D + d, _mm256_mul_ps(load8(qr + d, D - d), _mm256_set1_ps(p.scale)), D - d);
  }
  using QkFn = void (*)(const float*, int64_t, const T*, float*, int64_t, float);
  static constexpr QkFn kQk[5] = {nullptr, &qk_rows<1, T>, &qk_rows<2, T>, &qk_rows<3, T>, &qk_rows<4, T>};
  for (int64_t j = 0; j < n; ++j) {
    const T* kr = kc + slots[j] * p.k_s0 + h * p.k_s1;
    for (int64_t g0 = 0; g0 < G; g0 += 4)
      kQk[std::min<int64_t>(4, G - g0)](qf + g0 * D, D, kr, sc + g0 * n + j, n, p.softcap);
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax of the row
    float* s = sc + g * n;
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
    __m256 tot = _mm256_setzero_ps();
    const __m256 mv = _mm256_set1_ps(mx);
    for (int64_t j = 0; j < n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(load8(s + j, n - j), mv));
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - j)),
                                                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
      const __m256 ek = _mm256_and_ps(e, keep);
      tot = _mm256_add_ps(tot, ek);
      store8(s + j, ek, n - j);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(tot));
    for (int64_t j = 0; j < n; j += 8) store8(s + j, _mm256_mul_ps(load8(s + j, n - j), inv), n - j);
  }
  // P @ V: 16 dims of up to 4 rows at a time in registers, keys in order
  using PvFn = void (*)(const float*, int64_t, const T*, const int64_t*, int64_t, int64_t, float*, int64_t);
  static constexpr PvFn kPv[5] = {nullptr, &pv_rows<1, T>, &pv_rows<2, T>, &pv_rows<3, T>, &pv_rows<4, T>};
  const T* vh = vc + h * p.v_s1;
  for (int64_t g0 = 0; g0 < G; g0 += 4)
    for (int64_t d0 = 0; d0 < Dv; d0 += 16)
      kPv[std::min<int64_t>(4, G - g0)](sc + g0 * n, n, vh + d0, slots.data(), p.v_s0, Dv - d0, acc + g0 * Dv + d0,
                                        Dv);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < Dv; d += 8) store8(out + g * Dv + d, load8(acc + g * Dv + d, Dv - d), Dv - d);
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
  const Params p{Hq, Hk, D, Dv, Hq / Hk, block_size, window, q.stride(0), q.stride(1), k_cache.stride(0),
                 k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), static_cast<float>(scale),
                 static_cast<float>(softcap)};
  auto run = [&](auto* qp, auto* kp, auto* vp, auto* op_) {
    auto work = [&](int64_t i0, int64_t i1) {
      std::vector<float> scratch;
      std::vector<int64_t> slot_buf;
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t i = it / Hk, h = it % Hk;
        attend_head(qp + i * p.q_s0, kp, vp, tp + i * width, lp[i], h, p, op_ + (i * Hq + h * p.G) * Dv, scratch,
                    slot_buf);
      }
    };
    int64_t keys = 0;
    for (int64_t i = 0; i < S; ++i) keys += lp[i];
    if (keys * Hk < 1024)
      work(0, S * Hk);
    else
      mistralrs_pool::parallel_for(0, S * Hk, 1, work);
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
