// bf16 linear on AVX2/FMA CPUs (no AVX-512): y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), W bf16 as stored.
//
// Arithmetic, fp32 throughout: the rows of x are converted to fp32 once per call (bf16 is exact in fp32);
// each bf16 weight is widened to fp32 in registers (its 16 bits become the high half of a 32-bit lane).
// The fp32 rows of x are stored permuted within each group of 16 elements, in the order in which one 256-bit
// load of 16 bf16 weights widens: its 8 even elements (a 32-bit shift left by 16) and its 8 odd ones (the
// high halves, masked), so a weight vector costs one integer op per 8 elements.
//
// Batch invariance: every output (m, n) is computed by one arithmetic sequence that depends only on row m of
// x and row n of W: for each K block of kKB elements in order, one 8-lane accumulator starting at zero gets
// two fmadds per 16 elements (even ones, then odd ones) in order, is reduced by one fixed tree (hsum8) and added to the output's running
// fp32 sum (starting at zero); then the bias is added. The register tiles (MR rows of x against NR rows of W)
// only share loads between outputs; every vector operation is lane-wise per output. So a row's result is
// bit-identical alone, in any batch, in any tile position, on any number of threads, in the GEMV and the
// GEMM schedule. The build passes -ffp-contract=off: every fmadd is explicit.
//
// Schedules (threads split N into contiguous ranges, at::parallel_for with torch's thread count; small
// problems run on the calling thread):
// - M <= kGemvRows (decode): tiles of all M rows against NR rows of W taken from NR equal parts of the
//   thread's range (NR long sequential streams through W, as the qmatmul GEMV does); W is read once.
// - M > kGemvRows: each work item is a panel of weight rows; for each K block, the panel's slice (kept in L2)
//   is run past all rows of x in tiles of 5 rows x 2 weight rows (x's slice of 5 rows stays in L1/L2).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "avx2_common.h"

namespace {

using cpu_quant::hsum8;

constexpr int64_t kKB = 2048;                       // K block (elements): the unit of the reduction order
constexpr int kGemvRows = 4;                        // M up to this: one pass over W
constexpr int kGemmMR = 5;                          // GEMM tile rows of x
constexpr int kGemmNR = 2;                          // GEMM tile rows of W
constexpr int64_t kPanelBytes = 256 * 1024;         // bytes of a K-block slice of a GEMM panel of W (L2)
constexpr int64_t kInlineMacs = int64_t(1) << 18;   // less work than this runs on the calling thread


// MR rows of (permuted fp32) x against NR rows of bf16 W over [k0, k1): part[m * ldp + r] += hsum8(acc).
// Per 16 elements and output: acc = fmadd(w_even, x_even, acc), then acc = fmadd(w_odd, x_odd, acc). The
// weights are loaded once per half (the second load hits L1), so that only NR weight vectors are live: with
// MR x NR accumulators, one vector of x and the mask that is 14 registers for 5 x 2 (no spills: a spilled
// accumulator puts a store-to-load forwarding into its dependency chain, which halved the speed of 4 x 3).
// An opaque identity: keeps the compiler from folding a load of x into each fmadd (one load per use).
ALWAYS_INLINE inline __m256 keep(__m256 v) {
  asm("" : "+x"(v));
  return v;
}

template <int MR, int NR>
void tile(const float* const* x, const uint16_t* const* w, int64_t k0, int64_t k1, float* part, int64_t ldp) {
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 16) {
    if constexpr (MR == 1) {  // x first, each weight vector used as soon as it is widened (8 rows: no spills)
      const __m256 xe = keep(_mm256_loadu_ps(x[0] + k)), xo = keep(_mm256_loadu_ps(x[0] + k + 8));
      UNROLL for (int r = 0; r < NR; ++r) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k));
        acc[0][r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[0][r]);
        acc[0][r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)), xo, acc[0][r]);
      }
      continue;
    }
    __m256 wv[NR];
    UNROLL for (int r = 0; r < NR; ++r)  // even elements: the low bf16 of each 32-bit pair, moved up
      wv[r] = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), 16));
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = keep(_mm256_loadu_ps(x[m] + k));
      UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
    UNROLL for (int r = 0; r < NR; ++r)  // odd elements: the high bf16, in place
      wv[r] = _mm256_castsi256_ps(
          _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k)), hi_mask));
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = keep(_mm256_loadu_ps(x[m] + k + 8));
      UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) part[m * ldp + r] += hsum8(acc[m][r]);
}

using TileFn = void (*)(const float* const*, const uint16_t* const*, int64_t, int64_t, float*, int64_t);

template <int MR>
TileFn gemm_tile(int nr) {
  switch (nr) {
    case 1: return &tile<MR, 1>;
    default: return &tile<MR, 2>;
  }
}

TileFn gemm_tile_for(int mr, int nr) {
  switch (mr) {
    case 1: return gemm_tile<1>(nr);
    case 2: return gemm_tile<2>(nr);
    case 3: return gemm_tile<3>(nr);
    case 4: return gemm_tile<4>(nr);
    default: return gemm_tile<5>(nr);
  }
}

// GEMV tiles: rows of W per tile for M rows of x (enough independent accumulators, few enough registers).
constexpr int gemv_nr(int mr) { return mr == 1 ? 8 : mr == 2 ? 4 : mr == 3 ? 3 : 2; }

TileFn gemv_tile_for(int mr) {
  switch (mr) {
    case 1: return &tile<1, gemv_nr(1)>;
    case 2: return &tile<2, gemv_nr(2)>;
    case 3: return &tile<3, gemv_nr(3)>;
    default: return &tile<4, gemv_nr(4)>;
  }
}
static_assert(kGemvRows == 4 && kGemmMR == 5 && kGemmNR == 2, "the tile tables instantiate these sizes");

ALWAYS_INLINE inline void store_out(float* y, float v) { *y = v; }
ALWAYS_INLINE inline void store_out(at::BFloat16* y, float v) { *y = c10::BFloat16(v); }

// A row of x (bf16 or fp32, contiguous K) into dst as fp32, each group of 16 reordered as the weights unpack:
// the 8 even elements, then the 8 odd ones.
template <typename InT>
void convert_row(const InT* src, int64_t K, float* dst) {
  for (int64_t k = 0; k < K; k += 16)
    for (int j = 0; j < 8; ++j) {
      dst[k + j] = static_cast<float>(src[k + 2 * j]);
      dst[k + 8 + j] = static_cast<float>(src[k + 2 * j + 1]);
    }
}

template <typename OutT>
void run(const float* xf, int64_t M, int64_t K, const uint16_t* w, int64_t N, const float* bias, OutT* y) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool gemv = M <= kGemvRows;
  const int64_t per_thread = (N + threads - 1) / threads;
  int64_t panel;
  if (gemv) {
    panel = per_thread;
  } else {
    panel = std::max<int64_t>(kGemmNR, kPanelBytes / (2 * std::min(K, kKB)));
    panel = std::min(panel, per_thread);
  }
  panel = std::max<int64_t>(8, (panel + 7) / 8 * 8);
  const int64_t items = (N + panel - 1) / panel;

  auto work = [&](int64_t i0, int64_t i1) {
    std::vector<float> part;
    if (!gemv) part.resize(M * panel);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * panel, n1 = std::min(N, n0 + panel), len = n1 - n0;
      if (gemv) {
        const int mr = static_cast<int>(M);
        const int g = gemv_nr(mr);
        const TileFn fn = gemv_tile_for(mr);
        const float* xs[kGemvRows];
        for (int m = 0; m < mr; ++m) xs[m] = xf + m * K;
        const int64_t stride = (len + g - 1) / g;
        for (int64_t i = 0; i < stride; ++i) {
          int64_t col[8];
          const uint16_t* rows[8];
          float acc[kGemvRows * 8];
          std::fill(acc, acc + mr * g, 0.0f);
          for (int r = 0; r < g; ++r) {
            col[r] = r * stride + i;
            rows[r] = w + (n0 + std::min(col[r], len - 1)) * K;
          }
          for (int64_t k0 = 0; k0 < K; k0 += kKB) fn(xs, rows, k0, std::min(K, k0 + kKB), acc, g);
          for (int r = 0; r < g; ++r) {
            if (col[r] >= len) continue;  // a repeated row filling the tile
            const int64_t n = n0 + col[r];
            for (int m = 0; m < mr; ++m) {
              const float v = acc[m * g + r];
              store_out(y + m * N + n, bias ? v + bias[n] : v);
            }
          }
        }
      } else {
        std::fill(part.begin(), part.begin() + M * len, 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kKB) {
          const int64_t k1 = std::min(K, k0 + kKB);
          for (int64_t m0 = 0; m0 < M; m0 += kGemmMR) {
            const int mr = static_cast<int>(std::min<int64_t>(kGemmMR, M - m0));
            const float* xs[kGemmMR];
            for (int m = 0; m < mr; ++m) xs[m] = xf + (m0 + m) * K;
            for (int64_t c = 0; c < len; c += kGemmNR) {
              const int nr = static_cast<int>(std::min<int64_t>(kGemmNR, len - c));
              const uint16_t* rows[kGemmNR];
              for (int r = 0; r < nr; ++r) rows[r] = w + (n0 + c + r) * K;
              gemm_tile_for(mr, nr)(xs, rows, k0, k1, part.data() + m0 * len + c, len);
            }
          }
        }
        for (int64_t m = 0; m < M; ++m)
          for (int64_t c = 0; c < len; ++c) {
            const float v = part[m * len + c];
            store_out(y + m * N + n0 + c, bias ? v + bias[n0 + c] : v);
          }
      }
    }
  };
  if (threads == 1 || items == 1 || M * N * K < kInlineMacs) {
    work(0, items);
  } else {
    at::parallel_for(0, items, 1, work);
  }
}

// x: [M, K] bf16 or fp32 (rows contiguous), K a multiple of 16; weight: bf16 [N, K] contiguous; bias [N] or
// None. Returns [M, N] in x's dtype, or fp32 with out_f32.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool out_f32) {
  TORCH_CHECK(x.dim() == 2, "linear_bf16: x must be 2-D [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16, "linear_bf16: weight must be bf16 [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "linear_bf16: x must be fp32 or bf16");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16: CPU tensors only");
  TORCH_CHECK(weight.is_contiguous(), "linear_bf16: weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "linear_bf16: weight has ", weight.size(1), " columns, x has ", K);
  TORCH_CHECK(K % 16 == 0, "linear_bf16: K = ", K, " is not a multiple of 16");
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_bf16: bias has ", bias->numel(), " elements, expected ", N);
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
  // 64-byte aligned (K is a multiple of 16, so every row is): no 32-byte load of x crosses a cache line.
  std::unique_ptr<float, decltype(&std::free)> xf(static_cast<float*>(std::aligned_alloc(64, M * K * sizeof(float))),
                                                  &std::free);
  TORCH_CHECK(xf, "linear_bf16: out of memory for the fp32 copy of x");
  const int64_t ldx = xc.stride(0);
  auto conv = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (xc.scalar_type() == at::kFloat)
        convert_row(xc.data_ptr<float>() + r * ldx, K, xf.get() + r * K);
      else
        convert_row(xc.data_ptr<at::BFloat16>() + r * ldx, K, xf.get() + r * K);
    }
  };
  if (M >= 16 && M * K >= (int64_t(1) << 16))
    at::parallel_for(0, M, 1, conv);
  else
    conv(0, M);
  const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  if (out_type == at::kFloat)
    run(xf.get(), M, K, w, N, bias_ptr, y.data_ptr<float>());
  else
    run(xf.get(), M, K, w, N, bias_ptr, y.data_ptr<at::BFloat16>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias, bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
}
