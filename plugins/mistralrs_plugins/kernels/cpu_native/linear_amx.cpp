// bf16 matmul on CPUs with AMX (amx_tile, amx_bf16): y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]), fp32
// accumulation, bf16 (or fp32) out, for any number of rows, with batch-invariant results.
//
// The transposed product is tiled: C^T[n, m] = W[n, :] . x[m, :]. A tiles are 16 rows of W as stored (16 x 32
// bf16, row stride K: W is never repacked), B tiles 32 K-values of 16 rows of x, packed per call as AMX wants
// them ([K/2][16 rows][2]), C tiles 16 x 16 fp32 accumulators. `tdpbf16ps` adds each 32-value slice of K to an
// output in one fixed order (the hardware's), and an output's slices are added in K order: every output gets
// the same arithmetic whatever M, its row's position, the tile pairing or the thread count, so a row's
// result does not depend on what else is in the batch (decode and prefill alike).
//
// Schedule: threads split N into ranges of 32-row blocks; a block's two A tiles are loaded once per K step and
// used against one or two B tiles (16 or 32 rows of x); the blocks of x go by one pair at a time. The op needs
// K % 32 == 0 and N % 32 == 0 (ops.py routes other shapes, which depend only on the layer, to the AVX-512
// kernel) and the OS's permission to use AMX tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include "../thread_pool.h"

namespace {

constexpr long kArchReqXcompPerm = 0x1023;
constexpr long kXfeatureXtiledata = 18;

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void store_out(float* y, float v) { *y = v; }
inline void store_out(c10::BFloat16* y, float v) { *y = c10::BFloat16(v); }

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw")

// Decode (one block of rows of x): every row of W's 32 is software-prefetched this many elements ahead (two cache
// lines: measured best of 32..1024 on Sapphire Rapids, 2 threads; it lifts the 128k-row LM head from 21 to 26 GB/s).
constexpr int64_t kPrefetch = 64;

// Tiles 0..3: C (n block half h, x block j) = tile 2h + j; 4, 5: A (the two halves of the 32 rows of W);
// 6, 7: B (x blocks j = 0, 1). All 16 rows of 64 bytes.
void configure_tiles() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// The C tile `t` (16 rows of W from n, 16 rows of x from m) into y, with the bias.
template <typename OutT>
inline void store_tile(const float* buf, int64_t n, int64_t m, int64_t M, int64_t N, const float* bias, OutT* y) {
  for (int64_t j = 0; j < 16 && m + j < M; ++j) {
    OutT* row = y + (m + j) * N + n;
    for (int i = 0; i < 16; ++i) store_out(row + i, bias ? buf[i * 16 + j] + bias[n + i] : buf[i * 16 + j]);
  }
}

template <typename OutT>
void run(const uint16_t* w, const uint16_t* xp, int64_t M, int64_t K, int64_t N, const float* bias, OutT* y) {
  const int64_t mblocks = (M + 15) / 16;
  const int64_t nblocks = N / 32;
  const bool prefetch = mblocks == 1;  // few rows of x: W is the traffic
  auto work = [&](int64_t b0, int64_t b1) {
    configure_tiles();
    alignas(64) float buf[256];
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t n0 = nb * 32;
      const uint16_t* w0 = w + n0 * K;
      const uint16_t* w1 = w + (n0 + 16) * K;
      for (int64_t mb = 0; mb < mblocks; mb += 2) {
        const bool pair = mb + 1 < mblocks;
        const uint16_t* x0 = xp + mb * K * 16;
        const uint16_t* x1 = xp + (mb + 1) * K * 16;
        _tile_zero(0);
        _tile_zero(2);
        if (pair) {
          _tile_zero(1);
          _tile_zero(3);
        }
        for (int64_t k = 0; k < K; k += 32) {
          if (prefetch && k + kPrefetch < K) {  // decode: W streams from memory in 32 rows at once
            for (int r = 0; r < 16; ++r) {
              _mm_prefetch(reinterpret_cast<const char*>(w0 + r * K + k + kPrefetch), _MM_HINT_T0);
              _mm_prefetch(reinterpret_cast<const char*>(w1 + r * K + k + kPrefetch), _MM_HINT_T0);
            }
          }
          _tile_loadd(4, w0 + k, K * 2);
          _tile_loadd(5, w1 + k, K * 2);
          _tile_loadd(6, x0 + k * 16, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (pair) {
            _tile_loadd(7, x1 + k * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, buf, 64);
        store_tile(buf, n0, mb * 16, M, N, bias, y);
        _tile_stored(2, buf, 64);
        store_tile(buf, n0 + 16, mb * 16, M, N, bias, y);
        if (pair) {
          _tile_stored(1, buf, 64);
          store_tile(buf, n0, (mb + 1) * 16, M, N, bias, y);
          _tile_stored(3, buf, 64);
          store_tile(buf, n0 + 16, (mb + 1) * 16, M, N, bias, y);
        }
      }
    }
    _tile_release();
  };
  if (at::get_num_threads() == 1 || nblocks == 1 || M * N * K < (int64_t(1) << 18))
    work(0, nblocks);
  else
    mistralrs_pool::parallel_for(0, nblocks, 1, work);
}

#pragma GCC pop_options

// x bf16 [M, K] (rows contiguous), weight bf16 [N, K] contiguous, K % 32 == 0, N % 32 == 0, bias [N] or None.
at::Tensor linear_bf16_amx(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           bool out_f32) {
  TORCH_CHECK(amx_permitted(), "linear_bf16_amx: the OS does not permit AMX tile data");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "linear_bf16_amx: x must be bf16 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "linear_bf16_amx: weight must be a contiguous bf16 [N, K]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "linear_bf16_amx: CPU tensors only");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && K % 32 == 0 && N % 32 == 0, "linear_bf16_amx: needs K % 32 == 0 and N % 32 == 0");
  at::Tensor bias_f;
  const float* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "linear_bf16_amx: bias has ", bias->numel(), " elements, expected ", N);
    bias_f = bias->to(at::kFloat).contiguous();
    bias_ptr = bias_f.data_ptr<float>();
  }
  const auto out_type = out_f32 ? at::kFloat : at::kBFloat16;
  at::Tensor y = at::empty({M, N}, x.options().dtype(out_type));
  if (M == 0 || N == 0) return y;
  // x packed per block of 16 rows: [K/2][16][2] bf16 (a pair of K values of each row side by side), zero rows
  // past M. As uint32 pairs: xp32[mb][k/2][r] = x32[16 mb + r][k/2].
  const int64_t mblocks = (M + 15) / 16;
  std::unique_ptr<uint32_t, decltype(&std::free)> xp(
      static_cast<uint32_t*>(std::aligned_alloc(64, mblocks * (K / 2) * 16 * sizeof(uint32_t))), &std::free);
  TORCH_CHECK(xp, "linear_bf16_amx: out of memory");
  std::memset(xp.get(), 0, mblocks * (K / 2) * 16 * sizeof(uint32_t));
  const int64_t ldx = x.stride(0);
  const auto* x32 = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* row = x32 + m * ldx;
    uint32_t* dst = xp.get() + (m / 16) * (K / 2) * 16 + (m % 16);
    for (int64_t p = 0; p < K / 2; ++p) {
      uint32_t v;
      std::memcpy(&v, row + 2 * p, 4);
      dst[p * 16] = v;
    }
  }
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  const auto* xq = reinterpret_cast<const uint16_t*>(xp.get());
  if (out_f32)
    run(w, xq, M, K, N, bias_ptr, y.data_ptr<float>());
  else
    run(w, xq, M, K, N, bias_ptr, reinterpret_cast<c10::BFloat16*>(y.data_ptr<at::BFloat16>()));
  return y;
}

bool amx_available() { return amx_permitted(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16_amx(Tensor x, Tensor weight, Tensor? bias=None, bool out_f32=False) -> Tensor");
  m.def("amx_available() -> bool");
}

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CPU, m) { m.impl("linear_bf16_amx", &linear_bf16_amx); }

TORCH_LIBRARY_IMPL(TORCH_EXTENSION_NAME, CatchAll, m) { m.impl("amx_available", &amx_available); }
