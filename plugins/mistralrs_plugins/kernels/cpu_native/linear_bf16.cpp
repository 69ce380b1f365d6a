// Decode GEMV for bf16 on AVX-512-BF16 CPUs.
//
//   y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]),  bf16 in, fp32 accumulation, bf16 out (round to nearest even)
//
// For small M (1..8 rows: batch-1 decode and small decode batches) the product is bound by reading W
// once. W stays in its original row-major [N, K] layout: a tile of R consecutive rows is streamed 64
// bytes (32 bf16) per row per step, every row of x is multiplied into it with `vdpbf16ps` (pairs of K
// accumulated into 16 fp32 lanes), and each accumulator is reduced horizontally once at the end of K.
// Threads split N into contiguous ranges of tiles (at::parallel_for, torch's thread count), so W is
// read exactly once per call, in sequential order per thread. K tails use masked (zeroing) loads, so
// any K works; N tails are handled one row at a time.

// Only light headers (no <torch/extension.h>, no Python): the op is registered with the dispatcher
// under the namespace TORCH_EXTENSION_NAME (set by cpp_extension) and called as
// torch.ops.<namespace>.linear_bf16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

// How far ahead (bytes) each row stream is prefetched into L1.
constexpr int64_t kPrefetchAhead = 1024;

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Rows per tile for a given number of x rows: keeps M*R accumulators + R weight registers within the
// 32 zmm registers.
template <int M>
struct TileRows {
  static constexpr int value = M <= 2 ? 8 : (M <= 4 ? 4 : (M <= 6 ? 3 : 2));
};

// One tile: R rows of W (starting at w, row stride ldw) against M rows of x (row stride ldx).
// Writes the M x R fp32 dot products to acc_out[m * R + r].
template <int M, int R>
inline void tile_dot(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w, int64_t ldw,
                     int64_t K, float* __restrict acc_out) {
  __m512 acc[M][R];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();

  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint16_t* p = w + r * ldw + k;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetchAhead, _MM_HINT_T0);
      wv[r] = _mm512_loadu_si512(reinterpret_cast<const void*>(p));
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(reinterpret_cast<const void*>(x + m * ldx + k));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], as_bh(xv), as_bh(wv[r]));
    }
  }
  if (k < K) {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (K - k)) - 1ull);
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w + r * ldw + k);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], as_bh(xv), as_bh(wv[r]));
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc_out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
}

inline uint16_t to_bf16_bits(float v) {
  // Round to nearest even, as torch does (NaN stays NaN).
  return c10::BFloat16(v).x;
}

template <int M>
void gemv_rows(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t N, int64_t K, const float* bias,
               uint16_t* y, int64_t ldy) {
  constexpr int R = TileRows<M>::value;
  const int64_t full_tiles = N / R;
  const int64_t tail = N - full_tiles * R;
  const int64_t tiles = full_tiles + (tail ? 1 : 0);
  // Enough work per thread chunk that the fork/join is amortised (~256 KiB of weights).
  const int64_t bytes_per_tile = static_cast<int64_t>(R) * K * 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, bytes_per_tile));

  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    float acc[M * R];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * R;
      if (t < full_tiles) {
        tile_dot<M, R>(x, ldx, w + n0 * K, K, K, acc);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) {
            float v = acc[m * R + r];
            if (bias) v += bias[n0 + r];
            y[m * ldy + n0 + r] = to_bf16_bits(v);
          }
      } else {
        for (int64_t n = n0; n < N; ++n) {
          tile_dot<M, 1>(x, ldx, w + n * K, K, K, acc);
          for (int m = 0; m < M; ++m) {
            float v = acc[m];
            if (bias) v += bias[n];
            y[m * ldy + n] = to_bf16_bits(v);
          }
        }
      }
    }
  });
}

using GemvFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, uint16_t*,
                        int64_t);

constexpr int kMaxRows = 8;
const GemvFn kGemv[kMaxRows + 1] = {nullptr,        gemv_rows<1>, gemv_rows<2>, gemv_rows<3>, gemv_rows<4>,
                                    gemv_rows<5>, gemv_rows<6>, gemv_rows<7>, gemv_rows<8>};

// x: [M, K] bf16 (M <= 8, last dim contiguous), weight: [N, K] bf16 contiguous, bias: [N] (any float dtype).
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "linear_bf16: x must be 2-D [M, K]");
  TORCH_CHECK(weight.dim() == 2, "linear_bf16: weight must be 2-D [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_bf16: x and weight must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "linear_bf16: x has ", K, " features but weight has ", weight.size(1));
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "linear_bf16: 1..", kMaxRows, " rows supported, got ", M);
  TORCH_CHECK(weight.is_contiguous(), "linear_bf16: weight must be contiguous");

  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_bf16: bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  at::Tensor y = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return y;
  if (K == 0) {
    if (bias_ptr) return bias_f.to(at::kBFloat16).unsqueeze(0).expand({M, N}).contiguous();
    return y.zero_();
  }
  kGemv[M](reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), xc.stride(0),
           reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>()), N, K, bias_ptr,
           reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), N);
  return y;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
