// bf16 matmul on AVX-512-BF16 CPUs, for any number of rows, with batch-invariant results.
//
//   y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]),  bf16 in, fp32 accumulation, bf16 (or fp32) out
//
// W stays in its original row-major [N, K] layout (nothing is repacked). All products run along K with
// `vdpbf16ps` (32 bf16 of x times 32 bf16 of W, pairwise accumulated into 16 fp32 lanes).
//
// Batch invariance: every output element is computed by the same arithmetic whatever M, the schedule or
// the row's position in the batch: for each K block of kKBlock elements in order, one accumulator over the
// block's 64-byte lines in order (the last one masked), reduced by one fixed horizontal tree (hsum /
// reduce4), the block sums added in order, then the bias. So a request's tokens do not depend on what else
// is batched with it (decode beside 15 others, or its prompt prefilled with others).
//
// - M <= 4, memory-bound (decode):
//   - "row" schedule (x small enough to stay in L1): one row of W at a time, every row of x multiplied into
//     each 64-byte line of W. Consecutive rows are adjacent, so each thread reads one strictly sequential
//     stream, which the hardware prefetcher likes best.
//   - "tile" schedule (x too big for L1, e.g. M=4 and K=8192): 4 rows of W at once, so every line of x
//     loaded is used 4 times.
//   No software prefetch: on a 2-core Zen 4 VM the hardware prefetchers alone streamed W 10-20% faster
//   (M=1, 36-42 GB/s against 25-38 with lines prefetched 1-4 KiB ahead; M=4 +7-16%).
// - M >= 5 ("blocked" schedule, compute matters): register tiles of MB rows of x by R rows of W (MB * R <=
//   24 fp32 accumulators + R weight registers + 1 x register in the 32 zmm registers: 3 x 8 for M <= 8,
//   else 4 x 6), so each line of W loaded is used MB times and each line of x R times. A thread walks its
//   range of N in panels of kPanelRows rows; for each K block of a panel it runs the rows in passes of MB
//   over the panel's tiles: the x block of a pass (<= 32 KiB) stays in L1 across the tiles, the first pass
//   pulls the panel's W block into the caches and the later passes re-read it from L2. While a work item
//   (panel, K block) computes, the W of the next one is software-prefetched, a few lines per step, spread
//   over all its passes. Rows beyond kMChunk (prefill) are done in chunks of kMChunk rows, so that a chunk's
//   x stays in L2 while W streams.
// Threads split N into contiguous ranges (at::parallel_for with torch's thread count), so W is read from
// memory once per call (per row chunk). N tails are handled one row of W at a time.
//
// Measured on a 2-core AMD EPYC (Zen 5) VM (benchmarks/linear_bf16.py), GB/s of weights read, native vs
// torch's bf16 F.linear (oneDNN): M=1 35-50 vs 13-23, M=8 24-31 vs 13-20, M=16 21-28 vs 12-17, M=32 14-17
// vs 9-13. At M=16-32 the kernel is close to compute-bound (~60% of the vdpbf16ps peak is reached while
// streaming W from DRAM, ~90% from L2).

// Only light headers (no <torch/extension.h>, no Python): the op is registered with the dispatcher
// under the namespace TORCH_EXTENSION_NAME (set by cpp_extension) and called as
// torch.ops.<namespace>.linear_bf16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include "../thread_pool.h"

namespace {

using mistralrs_native::reduce4;

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline uint16_t to_bf16_bits(float v) {
  // Round to nearest even, as torch does (NaN stays NaN).
  return c10::BFloat16(v).x;
}

// Output element stores: bf16 (the usual) or fp32 (LM-head logits, which sampling wants in fp32: no
// bf16 rounding and no separate conversion pass over [M, vocab]).
inline void store_out(uint16_t* y, float v) { *y = to_bf16_bits(v); }
inline void store_out(float* y, float v) { *y = v; }

inline __mmask32 tail_mask(int64_t left) {
  return left >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1ull << left) - 1ull);
}

// The sum of a's 16 lanes by reduce4's tree (lane 0 of reduce4 depends on its first argument only): every
// schedule reduces with this one tree, so results do not depend on the schedule.
inline float hsum(__m512 a) {
  const __m512 z = _mm512_setzero_ps();
  return _mm_cvtss_f32(reduce4(a, z, z, z));
}

constexpr int64_t kKBlock = 2048;  // elements of K per block: every output sums its K blocks in order

// ---- M <= 4: row and tile schedules ---------------------------------------------------------------

// Dot products of M rows of x (row stride ldx) with R rows of W (starting at w, row stride ldw) over K,
// K block by K block (see the batch-invariance note at the top). Writes out[m * R + r].
template <int M, int R>
inline void tile_dot(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w, int64_t ldw,
                     int64_t K, float* __restrict out) {
  for (int64_t kb = 0; kb < K; kb += kKBlock) {
    const int64_t kend = std::min(K, kb + kKBlock);
    __m512 acc[M][R];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    // Whole lines with plain loads (masked 512-bit loads run at about half the rate on Zen 4), the last
    // partial line masked: the same products either way.
    const auto step = [&](int64_t k, auto load) {
      __m512i wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        wv[r] = load(w + r * ldw + k);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        const __m512i xv = load(x + m * ldx + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], as_bh(xv), as_bh(wv[r]));
      }
    };
    int64_t k = kb;
    for (; k + 32 <= kend; k += 32) step(k, [](const uint16_t* p) { return _mm512_loadu_si512(p); });
    if (k < kend) {
      const __mmask32 mask = tail_mask(kend - k);
      step(k, [mask](const uint16_t* p) { return _mm512_maskz_loadu_epi16(mask, p); });
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float v = hsum(acc[m][r]);
        out[m * R + r] = kb == 0 ? v : out[m * R + r] + v;
      }
  }
}

// Schedules: rows of W per tile R (M * R accumulators + R weight registers fit in the 32 zmm registers).
template <int M>
struct RowSchedule {  // one row of W at a time
  static constexpr int R = 1;
};
template <int M>
struct TileSchedule {  // several rows of W per line of x
  static constexpr int R = 4;
};

template <int M, template <int> class Schedule, typename OutT>
void gemv(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t N, int64_t K, const float* bias,
          OutT* y, int64_t ldy) {
  constexpr int R = Schedule<M>::R;
  const int64_t full_tiles = N / R;
  const int64_t tiles = full_tiles + (N % R ? 1 : 0);
  // Enough work per thread chunk that the fork/join is amortised (~512 KiB of weights).
  const int64_t bytes_per_tile = static_cast<int64_t>(R) * K * 2;
  const int64_t grain = std::max<int64_t>(1, (int64_t(512) << 10) / std::max<int64_t>(1, bytes_per_tile));

  mistralrs_pool::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    float acc[M * R];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * R;
      if (t < full_tiles) {
        tile_dot<M, R>(x, ldx, w + n0 * K, K, K, acc);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) {
            float v = acc[m * R + r];
            if (bias) v += bias[n0 + r];
            store_out(y + m * ldy + n0 + r, v);
          }
      } else {
        for (int64_t n = n0; n < N; ++n) {
          tile_dot<M, 1>(x, ldx, w + n * K, K, K, acc);
          for (int m = 0; m < M; ++m) {
            float v = acc[m];
            if (bias) v += bias[n];
            store_out(y + m * ldy + n, v);
          }
        }
      }
    }
  });
}

template <typename OutT>
using GemvFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, const float*, OutT*,
                        int64_t);

constexpr int kMaxGemvRows = 4;  // the row / tile schedules serve M = 1..4
template <typename OutT>
struct GemvTables {
  static constexpr GemvFn<OutT> row[kMaxGemvRows + 1] = {
      nullptr, gemv<1, RowSchedule, OutT>, gemv<2, RowSchedule, OutT>, gemv<3, RowSchedule, OutT>,
      gemv<4, RowSchedule, OutT>};
  static constexpr GemvFn<OutT> tile[kMaxGemvRows + 1] = {
      nullptr, gemv<1, RowSchedule, OutT>, gemv<2, TileSchedule, OutT>, gemv<3, TileSchedule, OutT>,
      gemv<4, TileSchedule, OutT>};
};

// x rows up to this many bytes stay in L1 next to the weight stream: use the row schedule.
constexpr int64_t kRowScheduleMaxXBytes = 32 << 10;

// ---- 5 <= M <= 32: blocked schedule ------------------------------------------------------------------

// Walks a strided set of byte ranges (`rows` ranges of `seg` bytes, `stride` apart) one 64-byte line per
// step, prefetching each line; does nothing once done (or when `row` is null).
struct Prefetcher {
  const char* row = nullptr;
  int64_t col = 0, seg = 0, stride = 0, rows = 0;
  inline void step() {
    if (!row) return;
    _mm_prefetch(row + col, _MM_HINT_T0);
    col += 64;
    if (col >= seg) {
      col = 0;
      row += stride;
      if (--rows == 0) row = nullptr;
    }
  }
};

// Dot products of MB rows of x (row stride ldx) with R rows of W (row stride ldw) over klen elements of K
// (both pointers at the start of the K block), one line per step. Stores (or, when `accumulate`, adds)
// the block sums into out[m * ldo + r]. Each step advances the prefetcher `npf` lines.
template <int MB, int R>
void block_dot(const uint16_t* __restrict x, int64_t ldx, const uint16_t* __restrict w, int64_t ldw,
               int64_t klen, Prefetcher& pf, int npf, float* __restrict out, int64_t ldo, bool accumulate) {
  __m512 acc[MB][R];
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  // Whole lines with plain loads, the last partial line masked (as tile_dot).
  const auto step = [&](int64_t k, auto load) {
    for (int i = 0; i < npf; ++i) pf.step();
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = load(w + r * ldw + k);
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m512i xv = load(x + m * ldx + k);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], as_bh(xv), as_bh(wv[r]));
    }
  };
  int64_t k = 0;
  for (; k + 32 <= klen; k += 32) step(k, [](const uint16_t* p) { return _mm512_loadu_si512(p); });
  if (k < klen) {
    const __mmask32 mask = tail_mask(klen - k);
    step(k, [mask](const uint16_t* p) { return _mm512_maskz_loadu_epi16(mask, p); });
  }
  if constexpr (R == 4) {
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {  // reduce4 = hsum of each accumulator, four at once
      __m128 v = reduce4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
      if (accumulate) v = _mm_add_ps(_mm_loadu_ps(out + m * ldo), v);
      _mm_storeu_ps(out + m * ldo, v);
    }
  } else {
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const float v = hsum(acc[m][r]);
        out[m * ldo + r] = accumulate ? out[m * ldo + r] + v : v;
      }
  }
}

using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, Prefetcher&, int, float*,
                         int64_t, bool);

// block_dot<MB, R> for MB = 1..MBMAX (index MB).
template <int R, int MBMAX>
struct BlockTable {
  BlockFn f[9] = {};
  constexpr BlockTable() {
    f[1] = block_dot<1, R>;
    if constexpr (MBMAX >= 2) f[2] = block_dot<2, R>;
    if constexpr (MBMAX >= 3) f[3] = block_dot<3, R>;
    if constexpr (MBMAX >= 4) f[4] = block_dot<4, R>;
    if constexpr (MBMAX >= 5) f[5] = block_dot<5, R>;
    if constexpr (MBMAX >= 6) f[6] = block_dot<6, R>;
    if constexpr (MBMAX >= 7) f[7] = block_dot<7, R>;
    if constexpr (MBMAX >= 8) f[8] = block_dot<8, R>;
  }
};

constexpr int64_t kMChunk = 64;     // rows per gemm_blocked call: their x block stays in L2 while W streams
constexpr int64_t kPanelRows = 48;  // rows of W per panel (a multiple of every R)

// y[M, N] (1 <= M <= kMChunk; used for M >= 5) with R rows of W and up to MBMAX rows of x per register tile.
template <int R, int MBMAX, typename OutT>
void gemm_blocked(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t N, int64_t K,
                  const float* bias, OutT* y, int64_t ldy) {
  static constexpr BlockTable<R, MBMAX> table{};
  static constexpr BlockTable<1, 8> tail_table{};
  static_assert(kPanelRows % R == 0, "panels hold whole tiles");
  // Row blocks of x, as even as possible (e.g. M = 16, MBMAX = 6: 6 + 5 + 5).
  const int64_t nb = (M + MBMAX - 1) / MBMAX;
  int64_t mbs[kMChunk], m0s[kMChunk];
  for (int64_t b = 0, m0 = 0; b < nb; ++b) {
    mbs[b] = M / nb + (b < M % nb ? 1 : 0);
    m0s[b] = m0;
    m0 += mbs[b];
  }
  // Lines of the next work item's W to prefetch per step: a work item has R / nb lines of W per step of
  // its passes.
  const int npf = static_cast<int>((R + nb - 1) / nb);
  const int64_t Kc = std::min(K, kKBlock);
  constexpr int64_t tiles_per_panel = kPanelRows / R;
  const int64_t full = N / R;  // whole tiles; the N % R last rows are one extra work unit
  // Enough work per thread chunk that the fork/join is amortised (~256 KiB of weights).
  const int64_t grain = std::max<int64_t>(1, (int64_t(256) << 10) / std::max<int64_t>(1, int64_t(R) * K * 2));

  mistralrs_pool::parallel_for(0, full + (N % R ? 1 : 0), grain, [&](int64_t begin, int64_t end) {
    float out[kMChunk * kPanelRows];
    constexpr int64_t ldo = kPanelRows;
    const int64_t tend = std::min(end, full);
    for (int64_t p = begin; p < tend; p += tiles_per_panel) {
      const int64_t np = std::min(tiles_per_panel, tend - p);  // tiles in this panel
      const uint16_t* wp = w + p * R * K;
      for (int64_t kb = 0; kb < K; kb += Kc) {
        const int64_t klen = std::min(Kc, K - kb);
        // The next work item: this panel's next K block, or the next panel's first.
        Prefetcher pf;
        pf.stride = K * 2;
        if (kb + Kc < K) {
          pf.row = reinterpret_cast<const char*>(wp + kb + Kc);
          pf.seg = std::min(Kc, K - kb - Kc) * 2;
          pf.rows = np * R;
        } else if (p + np < tend) {
          pf.row = reinterpret_cast<const char*>(wp + np * R * K);
          pf.seg = Kc * 2;
          pf.rows = std::min(tiles_per_panel, tend - p - np) * R;
        }
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t j = 0; j < np; ++j)
            table.f[mbs[b]](x + m0s[b] * ldx + kb, ldx, wp + j * R * K + kb, K, klen, pf, npf,
                            out + m0s[b] * ldo + j * R, ldo, kb > 0);
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < np * R; ++c) {
          float v = out[m * ldo + c];
          if (bias) v += bias[p * R + c];
          store_out(y + m * ldy + p * R + c, v);
        }
    }
    if (end > full) {  // the N % R last rows, one at a time
      Prefetcher none;
      for (int64_t n = full * R; n < N; ++n) {
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
          const int64_t mb = std::min<int64_t>(8, M - m0);
          for (int64_t kb = 0; kb < K; kb += Kc)  // K block by K block, as every other output
            tail_table.f[mb](x + m0 * ldx + kb, ldx, w + n * K + kb, K, std::min(Kc, K - kb), none, 0, out + m0, 1,
                             kb > 0);
        }
        for (int64_t m = 0; m < M; ++m) {
          float v = out[m];
          if (bias) v += bias[n];
          store_out(y + m * ldy + n, v);
        }
      }
    }
  });
}

template <typename OutT>
void run_linear(const uint16_t* xp, int64_t ldx, int64_t M, const uint16_t* wp, int64_t N, int64_t K,
                const float* bias_ptr, OutT* yp) {
  for (int64_t m0 = 0; m0 < M; m0 += kMChunk) {  // prefill: chunks of rows (results do not depend on it)
    const int64_t mc = std::min(kMChunk, M - m0);
    const uint16_t* xc = xp + m0 * ldx;
    OutT* yc = yp + m0 * N;
    if (mc <= kMaxGemvRows) {
      const bool row_schedule = mc * K * 2 <= kRowScheduleMaxXBytes;
      const GemvFn<OutT> fn = row_schedule ? GemvTables<OutT>::row[mc] : GemvTables<OutT>::tile[mc];
      fn(xc, ldx, wp, N, K, bias_ptr, yc, N);
    } else if (mc <= 8) {
      gemm_blocked<3, 8>(xc, ldx, mc, wp, N, K, bias_ptr, yc, N);  // one pass: 3 x M tiles
    } else {
      gemm_blocked<4, 6>(xc, ldx, mc, wp, N, K, bias_ptr, yc, N);  // 4 x (<= 6) tiles
    }
  }
}

// x: [M, K] bf16 (last dim contiguous), weight: [N, K] bf16 contiguous, bias: [N] (any float dtype). The
// result is bf16, or fp32 with `out_f32`.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool out_f32) {
  TORCH_CHECK(x.dim() == 2, "linear_bf16: x must be 2-D [M, K]");
  TORCH_CHECK(weight.dim() == 2, "linear_bf16: weight must be 2-D [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16,
              "linear_bf16: x and weight must be bfloat16");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "linear_bf16: x has ", K, " features but weight has ", weight.size(1));
  TORCH_CHECK(M >= 1, "linear_bf16: x has no rows");
  TORCH_CHECK(weight.is_contiguous(), "linear_bf16: weight must be contiguous");

  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_bf16: bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  const auto out_type = out_f32 ? at::kFloat : at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_type).memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return y;
  if (K == 0) {
    if (bias_ptr) return bias_f.to(out_type).unsqueeze(0).expand({M, N}).contiguous();
    return y.zero_();
  }
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  if (out_f32)
    run_linear(xp, xc.stride(0), M, wp, N, K, bias_ptr, y.data_ptr<float>());
  else
    run_linear(xp, xc.stride(0), M, wp, N, K, bias_ptr, reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
  return y;
}

}  // namespace

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias=None, bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear_bf16", &linear_bf16); }
