// bf16 linear on AVX2/FMA CPUs (no AVX-512): y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), W bf16 as stored.
// The same tiles and schedules run FP8 E4M3 weights with block scales (linear_fp8, below): only the widening of a
// weight vector and a scale per K block differ (the `Bf16W` / `Fp8W` policies).
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
// fp32 sum (starting at zero) -- FP8: the K blocks are the scale blocks, and each block's sum is multiplied by
// its scale first; then the bias is added. The register tiles (MR rows of x against NR rows of W)
// only share loads between outputs; every vector operation is lane-wise per output. So a row's result is
// bit-identical alone, in any batch, in any tile position, on any number of threads, in the GEMV and the
// GEMM schedule. The build passes -ffp-contract=off: every fmadd is explicit.
//
// Schedules (threads split N into contiguous ranges, at::parallel_for with torch's thread count; small
// problems run on the calling thread):
// - M <= kGemvRows (decode): tiles of all M rows against NR rows of W taken from NR equal parts of the
//   thread's range (NR long sequential streams through W, as the qmatmul GEMV does); W is read once.
// - M > kGemvRows: each work item is a panel of weight rows; for each K block, the panel's slice (kept in L2)
//   is run past all rows of x in tiles of 5 rows x 2 weight rows, a K sub-block at a time (x's slice of 5 rows
//   stays in L1; the tiles' accumulators are carried between sub-blocks, so the arithmetic is unchanged).
// - M >= kWidenRows: the panel's K-block slice is first widened to fp32 (the vectors first/second give, pairs of
//   rows interleaved) and run in tiles of 6 rows x 2 weight rows, so that each weight is widened once per call
//   instead of once per tile of x: FP8, int8 and the 4-bit lookups cost as much per tile as bf16 then (their
//   prefill ran at half bf16's speed or less).

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
#include <new>
#include <vector>

#include "avx2_common.h"
#include "../thread_pool.h"

namespace {

using cpu_quant::hsum8;

constexpr int64_t kKB = 2048;                       // K block (elements): the unit of the reduction order
constexpr int kGemvRows = 4;                        // M up to this: one pass over W
constexpr int kGemmMR = 5;                          // GEMM tile rows of x
constexpr int kWideMR = 6;                          // GEMM tile rows of x on widened panels (no mask register)
constexpr int kMaxMR = 6;
constexpr int kGemmNR = 2;                          // GEMM tile rows of W
constexpr int64_t kPanelBytes = 256 * 1024;         // bytes of a K-block slice of a GEMM panel of W (L2)
constexpr int64_t kInlineMacs = int64_t(1) << 18;   // less work than this runs on the calling thread
constexpr int64_t kKSub = 512;                      // GEMM K sub-block: 5 rows of fp32 x in 10 KB of L1
constexpr int64_t kWidenRows = 16;                 // GEMM with at least this many rows of x: widen W per panel
constexpr int64_t kWidenedBytes = 192 * 1024;       // a widened panel's K-block slice (L2)

// 32-byte aligned vector storage (the carried accumulators are stored and loaded as whole vectors).
template <typename T>
struct Aligned32 {
  using value_type = T;
  Aligned32() = default;
  template <typename U>
  Aligned32(const Aligned32<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(32))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(32)); }
  bool operator==(const Aligned32&) const { return true; }
};


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

// Widening policies: 16 weights of a row from element k -> the fp32 lanes that meet x[k .. k+7] and x[k+8 .. k+15]
// as x is stored. `Regs` holds what a policy keeps in registers for a whole tile (Lut4W: its table); `at` finds
// element k of a row, `row_len` is a row's length in T.
// bf16: x is stored permuted (convert_row), so the first vector is the even elements (a 32-bit shift left by 16)
// and the second the odd ones (the high halves, masked). The others take x in order.
struct NoRegs {
  explicit NoRegs(const float*) {}
};

struct Bf16W {
  using T = uint16_t;
  using Regs = NoRegs;
  static constexpr bool kPermuted = true;
  ALWAYS_INLINE static const T* at(const T* row, int64_t k) { return row + k; }
  static int64_t row_len(int64_t K) { return K; }
  ALWAYS_INLINE static __m256 first(const T* p, const Regs&) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), 16));
  }
  ALWAYS_INLINE static __m256 second(const T* p, const Regs&) {
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                                _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

// E4M3: a byte moved to the high half of a 16-bit lane and shifted right arithmetically by one, bit 14 (the copied
// sign) cleared, is the fp16 whose value is the E4M3 value times 2^-8, subnormals included (vcvtph2ps is exact);
// the 2^8 is folded into the scales (kUnit).
struct Fp8W {
  using T = uint8_t;
  using Regs = NoRegs;
  static constexpr bool kPermuted = false;
  static constexpr float kUnit = 256.0f;
  ALWAYS_INLINE static const T* at(const T* row, int64_t k) { return row + k; }
  static int64_t row_len(int64_t K) { return K; }
  ALWAYS_INLINE static __m256 widen(__m128i hi_bytes) {
    return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(hi_bytes, 1), _mm_set1_epi16(static_cast<short>(0xBFFF))));
  }
  ALWAYS_INLINE static __m256 first(const T* p, const Regs&) {
    return widen(_mm_unpacklo_epi8(_mm_setzero_si128(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  ALWAYS_INLINE static __m256 second(const T* p, const Regs&) {
    return widen(_mm_unpackhi_epi8(_mm_setzero_si128(), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
};

// int8 codes (bitsandbytes LLM.int8 weights), converted exactly.
struct Int8W {
  using T = int8_t;
  using Regs = NoRegs;
  static constexpr bool kPermuted = false;
  ALWAYS_INLINE static const T* at(const T* row, int64_t k) { return row + k; }
  static int64_t row_len(int64_t K) { return K; }
  ALWAYS_INLINE static __m256 first(const T* p, const Regs&) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  ALWAYS_INLINE static __m256 second(const T* p, const Regs&) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
};

// 4-bit codes looked up in a 16-entry fp32 table (bitsandbytes NF4/FP4): two codes per byte, the first in the
// high nibble. 4 bytes -> 8 int32 lanes [b0, b0, b1, b1, ...] shifted by 4 / 0 and masked are the codes in order;
// two 8-entry permutes and a blend by code > 7 are their values.
struct Lut4W {
  using T = uint8_t;
  struct Regs {
    __m256 lo, hi;
    explicit Regs(const float* table) : lo(_mm256_loadu_ps(table)), hi(_mm256_loadu_ps(table + 8)) {}
  };
  static constexpr bool kPermuted = false;
  ALWAYS_INLINE static const T* at(const T* row, int64_t k) { return row + k / 2; }
  static int64_t row_len(int64_t K) { return K / 2; }
  ALWAYS_INLINE static __m256 lookup(uint32_t four, const Regs& t) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(four)),
                                                                _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1,
                                                                              -1, -1, -1, -1)));
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(bytes, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)),
                                         _mm256_set1_epi32(15));
    const __m256 hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx), hi);
  }
  ALWAYS_INLINE static __m256 first(const T* p, const Regs& t) {
    uint32_t four;
    std::memcpy(&four, p, 4);
    return lookup(four, t);
  }
  ALWAYS_INLINE static __m256 second(const T* p, const Regs& t) {
    uint32_t four;
    std::memcpy(&four, p + 4, 4);
    return lookup(four, t);
  }
};

// A GEMM panel's rows already widened (widen_rows): per 16 elements, the two vectors another policy's first and
// second give, stored in that order. The tiles' arithmetic is the same as on the raw rows; only the widening,
// done once per panel instead of once per tile of x, is gone.
struct F32W {
  using T = float;
  using Regs = NoRegs;
  ALWAYS_INLINE static const T* at(const T* row, int64_t k) { return row + k * kGemmNR; }
  ALWAYS_INLINE static __m256 first(const T* p, const Regs&) { return _mm256_load_ps(p); }
  ALWAYS_INLINE static __m256 second(const T* p, const Regs&) { return _mm256_load_ps(p + 8); }
};

// Rows [n0, n0 + rows) of W over [k0, k1) widened into dst (row r at dst + r * (k1 - k0), 32-byte aligned).
template <typename W>
void widen_rows(const typename W::T* w, int64_t row_len, int64_t n0, int64_t rows, int64_t k0, int64_t k1,
                const float* table, float* dst) {
  const typename W::Regs regs(table);
  const int64_t len = k1 - k0;
  for (int64_t r = 0; r < rows; ++r) {
    const typename W::T* row = w + (n0 + r) * row_len;
    float* d = dst + (r / kGemmNR) * kGemmNR * len + (r % kGemmNR) * 16;
    for (int64_t k = k0; k < k1; k += 16, d += 16 * kGemmNR) {
      _mm256_store_ps(d, W::first(W::at(row, k), regs));
      _mm256_store_ps(d + 8, W::second(W::at(row, k), regs));
    }
  }
}

// `scales` (or null): one per row of W, for this K block: part += scale * hsum8(acc) (an explicit product).
// `carry` (or null: the tile covers a whole K block): the tile covers part of a K block; its MR x NR accumulators
// are loaded from carry (unless `first`) and, unless `last`, stored back instead of reduced. The same chain of
// fmadds either way, so splitting a K block changes no result.
template <typename W, int MR, int NR>
void tile(const float* const* x, const typename W::T* const* w, int64_t k0, int64_t k1, const float* scales,
          const float* table, float* part, int64_t ldp, float* carry, bool first, bool last) {
  const typename W::Regs regs(table);
  __m256 acc[MR][NR];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r)
    acc[m][r] = first ? _mm256_setzero_ps() : _mm256_load_ps(carry + (m * NR + r) * 8);
  for (int64_t k = k0; k < k1; k += 16) {
    if constexpr (MR == 1) {  // x first, each weight vector used as soon as it is widened (8 rows: no spills)
      const __m256 xe = keep(_mm256_loadu_ps(x[0] + k)), xo = keep(_mm256_loadu_ps(x[0] + k + 8));
      UNROLL for (int r = 0; r < NR; ++r) {
        acc[0][r] = _mm256_fmadd_ps(W::first(W::at(w[r], k), regs), xe, acc[0][r]);
        acc[0][r] = _mm256_fmadd_ps(W::second(W::at(w[r], k), regs), xo, acc[0][r]);
      }
      continue;
    }
    __m256 wv[NR];
    UNROLL for (int r = 0; r < NR; ++r) wv[r] = W::first(W::at(w[r], k), regs);
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = keep(_mm256_loadu_ps(x[m] + k));
      UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
    UNROLL for (int r = 0; r < NR; ++r) wv[r] = W::second(W::at(w[r], k), regs);  // the second load hits L1
    UNROLL for (int m = 0; m < MR; ++m) {
      const __m256 xv = keep(_mm256_loadu_ps(x[m] + k + 8));
      UNROLL for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (!last) {
    UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r)
      _mm256_store_ps(carry + (m * NR + r) * 8, acc[m][r]);
    return;
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int r = 0; r < NR; ++r) {
    const float h = hsum8(acc[m][r]);
    part[m * ldp + r] += scales ? scales[r] * h : h;
  }
}

template <typename W>
using TileFn = void (*)(const float* const*, const typename W::T* const*, int64_t, int64_t, const float*,
                        const float*, float*, int64_t, float*, bool, bool);

template <typename W, int MR>
TileFn<W> gemm_tile(int nr) {
  switch (nr) {
    case 1: return &tile<W, MR, 1>;
    default: return &tile<W, MR, 2>;
  }
}

template <typename W>
TileFn<W> gemm_tile_for(int mr, int nr) {
  switch (mr) {
    case 1: return gemm_tile<W, 1>(nr);
    case 2: return gemm_tile<W, 2>(nr);
    case 3: return gemm_tile<W, 3>(nr);
    case 4: return gemm_tile<W, 4>(nr);
    case 5: return gemm_tile<W, 5>(nr);
    default: return gemm_tile<W, 6>(nr);
  }
}

// GEMV tiles: rows of W per tile for M rows of x (enough independent accumulators, few enough registers).
constexpr int gemv_nr(int mr) { return mr == 1 ? 8 : mr == 2 ? 4 : mr == 3 ? 3 : 2; }

template <typename W>
TileFn<W> gemv_tile_for(int mr) {
  switch (mr) {
    case 1: return &tile<W, 1, gemv_nr(1)>;
    case 2: return &tile<W, 2, gemv_nr(2)>;
    case 3: return &tile<W, 3, gemv_nr(3)>;
    default: return &tile<W, 4, gemv_nr(4)>;
  }
}
static_assert(kGemvRows == 4 && kGemmMR == 5 && kWideMR == 6 && kMaxMR == 6 && kGemmNR == 2,
              "the tile tables instantiate these sizes");

ALWAYS_INLINE inline void store_out(float* y, float v) { *y = v; }
ALWAYS_INLINE inline void store_out(at::BFloat16* y, float v) { *y = c10::BFloat16(v); }

// A row of x (bf16 or fp32, contiguous K) into dst as fp32; `permuted`: each group of 16 reordered as bf16
// weights unpack (the 8 even elements, then the 8 odd ones).
template <typename InT>
void convert_row(const InT* src, int64_t K, float* dst, bool permuted) {
  if (!permuted) {
    for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<float>(src[k]);
    return;
  }
  for (int64_t k = 0; k < K; k += 16)
    for (int j = 0; j < 8; ++j) {
      dst[k + j] = static_cast<float>(src[k + 2 * j]);
      dst[k + 8 + j] = static_cast<float>(src[k + 2 * j + 1]);
    }
}

// Per-block scales of W (FP8): scale[(n / block_n) * ld + kb] multiplies the K block kb (of kb_len elements)
// of row n. Without them (bf16) the K blocks are kKB long and nothing is scaled.
struct Scales {
  const float* s = nullptr;
  int64_t ld = 0, block_n = 1, kb_len = kKB;
  const float* table = nullptr;  // Lut4W: the codes' values
  ALWAYS_INLINE const float* row(int64_t n) const { return s + (n / block_n) * ld; }
};

template <typename W, typename OutT>
void run(const float* xf, int64_t M, int64_t K, const typename W::T* w, int64_t N, const float* bias,
         const Scales& sc, OutT* y) {
  using T = typename W::T;
  const int64_t kb_len = sc.kb_len, row_len = W::row_len(K);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool gemv = M <= kGemvRows;
  const bool widen = M >= kWidenRows;  // enough tiles of x per panel to pay for widening it once
  const int64_t per_thread = (N + threads - 1) / threads, kb_max = std::min(K, kb_len);
  int64_t panel;
  if (gemv) {
    panel = per_thread;
  } else {
    const int64_t row_bytes = widen ? kb_max * 4 : W::row_len(kb_max) * static_cast<int64_t>(sizeof(T));
    panel = std::max<int64_t>(kGemmNR, (widen ? kWidenedBytes : kPanelBytes) / std::max<int64_t>(1, row_bytes));
    panel = std::min(panel, per_thread);
  }
  panel = std::max<int64_t>(8, (panel + 7) / 8 * 8);
  const int64_t items = (N + panel - 1) / panel;

  auto work = [&](int64_t i0, int64_t i1) {
    std::vector<float> part;
    std::vector<float, Aligned32<float>> carry;  // the GEMM tiles' accumulators between K sub-blocks
    std::vector<float, Aligned32<float>> wide;   // the panel's K-block slice, widened
    if (!gemv) {
      part.resize(M * panel);
      carry.resize(panel * kMaxMR * 8);
      if (widen) wide.resize(panel * kb_max);
    }
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t n0 = it * panel, n1 = std::min(N, n0 + panel), len = n1 - n0;
      if (gemv) {
        const int mr = static_cast<int>(M);
        const int g = gemv_nr(mr);
        const TileFn<W> fn = gemv_tile_for<W>(mr);
        const float* xs[kGemvRows];
        for (int m = 0; m < mr; ++m) xs[m] = xf + m * K;
        const int64_t stride = (len + g - 1) / g;
        for (int64_t i = 0; i < stride; ++i) {
          int64_t col[8];
          const T* rows[8];
          const float* srows[8];
          float acc[kGemvRows * 8], s[8];
          std::fill(acc, acc + mr * g, 0.0f);
          for (int r = 0; r < g; ++r) {
            col[r] = r * stride + i;
            const int64_t n = n0 + std::min(col[r], len - 1);
            rows[r] = w + n * row_len;
            if (sc.s) srows[r] = sc.row(n);
          }
          for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kb_len, ++kb) {
            if (sc.s)
              for (int r = 0; r < g; ++r) s[r] = srows[r][kb];
            fn(xs, rows, k0, std::min(K, k0 + kb_len), sc.s ? s : nullptr, sc.table, acc, g, nullptr, true, true);
          }
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
        for (int64_t k0 = 0, kb = 0; k0 < K; k0 += kb_len, ++kb) {
          const int64_t k1 = std::min(K, k0 + kb_len), klen = k1 - k0;
          if (widen) widen_rows<W>(w, row_len, n0, len, k0, k1, sc.table, wide.data());
          const int64_t tile_mr = widen ? kWideMR : kGemmMR;  // 5 x 2 raw: 14 registers with the widening's
          for (int64_t m0 = 0; m0 < M; m0 += tile_mr) {
            const int mr = static_cast<int>(std::min<int64_t>(tile_mr, M - m0));
            const float* xs[kMaxMR];  // widened: from k0 on, as the widened rows
            for (int m = 0; m < mr; ++m) xs[m] = xf + (m0 + m) * K + (widen ? k0 : 0);
            // The K block in sub-blocks whose slice of x (mr rows) stays in L1 while the panel's rows pass it.
            for (int64_t s0 = k0; s0 < k1; s0 += kKSub) {
              const int64_t s1 = std::min(k1, s0 + kKSub);
              for (int64_t c = 0; c < len; c += kGemmNR) {
                const int nr = static_cast<int>(std::min<int64_t>(kGemmNR, len - c));
                const T* rows[kGemmNR];
                const float* wide_rows[kGemmNR];
                float s[kGemmNR];
                for (int r = 0; r < nr; ++r) {
                  rows[r] = w + (n0 + c + r) * row_len;
                  wide_rows[r] = wide.data() + c * klen + 16 * r;
                  if (sc.s) s[r] = sc.row(n0 + c + r)[kb];
                }
                float* out = part.data() + m0 * len + c;
                float* acc = carry.data() + c * kMaxMR * 8;
                if (widen)
                  gemm_tile_for<F32W>(mr, nr)(xs, wide_rows, s0 - k0, s1 - k0, sc.s ? s : nullptr, nullptr, out, len,
                                              acc, s0 == k0, s1 == k1);
                else
                  gemm_tile_for<W>(mr, nr)(xs, rows, s0, s1, sc.s ? s : nullptr, sc.table, out, len, acc, s0 == k0,
                                           s1 == k1);
              }
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
    mistralrs_pool::parallel_for(0, items, 1, work);
  }
}

// The shared part of the entry points: checks, x converted to fp32 (64-byte aligned: no 32-byte load of x
// crosses a cache line), the output, the run.
template <typename W>
at::Tensor linear_widened(const char* what, const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, const Scales& sc, bool out_f32) {
  TORCH_CHECK(x.dim() == 2, what, ": x must be 2-D [M, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": x must be fp32 or bf16");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), what, ": weight must be a contiguous [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == W::row_len(K), what, ": weight has ", weight.size(1), " columns, expected ",
              W::row_len(K), " for K = ", K);
  TORCH_CHECK(K % 16 == 0, what, ": K = ", K, " is not a multiple of 16");
  at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, what, ": bias has ", bias->numel(), " elements, expected ", N);
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
  std::unique_ptr<float, decltype(&std::free)> xf(static_cast<float*>(std::aligned_alloc(64, M * K * sizeof(float))),
                                                  &std::free);
  TORCH_CHECK(xf, what, ": out of memory for the fp32 copy of x");
  const int64_t ldx = xc.stride(0);
  auto conv = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (xc.scalar_type() == at::kFloat)
        convert_row(xc.data_ptr<float>() + r * ldx, K, xf.get() + r * K, W::kPermuted);
      else
        convert_row(xc.data_ptr<at::BFloat16>() + r * ldx, K, xf.get() + r * K, W::kPermuted);
    }
  };
  if (M >= 16 && M * K >= (int64_t(1) << 16))
    mistralrs_pool::parallel_for(0, M, 1, conv);
  else
    conv(0, M);
  const auto* w = reinterpret_cast<const typename W::T*>(weight.data_ptr());
  if (out_type == at::kFloat)
    run<W>(xf.get(), M, K, w, N, bias_ptr, sc, y.data_ptr<float>());
  else
    run<W>(xf.get(), M, K, w, N, bias_ptr, sc, y.data_ptr<at::BFloat16>());
  return y;
}

// x: [M, K] bf16 or fp32 (rows contiguous), K a multiple of 16; weight: bf16 [N, K] contiguous; bias [N] or
// None. Returns [M, N] in x's dtype, or fp32 with out_f32.
at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       bool out_f32) {
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "linear_bf16: weight must be bf16 [N, K]");
  return linear_widened<Bf16W>("linear_bf16", x, weight, bias, Scales{}, out_f32);
}

// The scales of a block-scaled op: fp32 [ceil(N / block_n), ceil(K / block_k)] times `unit`, contiguous.
Scales block_scales(const char* what, const at::Tensor& scale, int64_t N, int64_t K, int64_t block_n,
                    int64_t block_k, float unit, at::Tensor& keep) {
  TORCH_CHECK(block_n > 0 && block_k > 0 && block_k % 16 == 0, what, ": block_k must be a positive multiple of 16");
  const int64_t nb = (N + block_n - 1) / block_n, kb = (K + block_k - 1) / block_k;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == nb && scale.size(1) == kb, what, ": scale must be [", nb, ", ",
              kb, "]");
  keep = scale.to(at::kFloat).mul(static_cast<double>(unit)).contiguous();
  Scales sc;
  sc.s = keep.data_ptr<float>();
  sc.ld = kb;
  sc.block_n = block_n;
  sc.kb_len = block_k;  // the reduction's K blocks are the scale blocks
  return sc;
}

// x as linear_bf16; weight: uint8 [N, K], E4M3 bit patterns; scale: fp32 [ceil(N / block_n), ceil(K / block_k)],
// W[n, k] = e4m3(weight[n, k]) * scale[n / block_n, k / block_k]; block_k a multiple of 16 (one scale per tensor:
// a [1, 1] scale with block_n = N, block_k = K rounded up to 16).
at::Tensor linear_fp8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block_n,
                      int64_t block_k, const std::optional<at::Tensor>& bias, bool out_f32) {
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2, "linear_fp8: weight must be uint8 E4M3 bits [N, K]");
  at::Tensor keep;  // fp32 scales times 2^8 (the widening's unit; exact)
  const Scales sc = block_scales("linear_fp8", scale, weight.size(0), weight.size(1), block_n, block_k, Fp8W::kUnit,
                                 keep);
  return linear_widened<Fp8W>("linear_fp8", x, weight, bias, sc, out_f32);
}

// int8 weights [N, K] with block scales (as linear_fp8): W[n, k] = weight[n, k] * scale[n / block_n, k / block_k].
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t block_n,
                       int64_t block_k, const std::optional<at::Tensor>& bias, bool out_f32) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2, "linear_int8: weight must be int8 [N, K]");
  at::Tensor keep;
  const Scales sc = block_scales("linear_int8", scale, weight.size(0), weight.size(1), block_n, block_k, 1.0f, keep);
  return linear_widened<Int8W>("linear_int8", x, weight, bias, sc, out_f32);
}

// 4-bit codes [N, K / 2] (two per byte, the first in the high nibble) with a 16-entry fp32 table and block scales:
// W[n, k] = table[code[n, k]] * scale[n / block_n, k / block_k].
at::Tensor linear_lut4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& table, const at::Tensor& scale,
                       int64_t block_n, int64_t block_k, const std::optional<at::Tensor>& bias, bool out_f32) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "linear_lut4: packed must be uint8 [N, K / 2]");
  TORCH_CHECK(table.numel() == 16, "linear_lut4: the table must have 16 values");
  const at::Tensor t = table.to(at::kFloat).contiguous();
  at::Tensor keep;
  Scales sc = block_scales("linear_lut4", scale, packed.size(0), x.dim() == 2 ? x.size(1) : 0, block_n, block_k, 1.0f,
                           keep);
  sc.table = t.data_ptr<float>();
  return linear_widened<Lut4W>("linear_lut4", x, packed, bias, sc, out_f32);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16(Tensor x, Tensor weight, Tensor? bias, bool out_f32=False) -> Tensor");
  m.def("linear_fp8(Tensor x, Tensor weight, Tensor scale, int block_n, int block_k, Tensor? bias, "
        "bool out_f32=False) -> Tensor");
  m.def("linear_int8(Tensor x, Tensor weight, Tensor scale, int block_n, int block_k, Tensor? bias, "
        "bool out_f32=False) -> Tensor");
  m.def("linear_lut4(Tensor x, Tensor packed, Tensor table, Tensor scale, int block_n, int block_k, Tensor? bias, "
        "bool out_f32=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) {
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_fp8", &linear_fp8);
  m.impl("linear_int8", &linear_int8);
  m.impl("linear_lut4", &linear_lut4);
}
