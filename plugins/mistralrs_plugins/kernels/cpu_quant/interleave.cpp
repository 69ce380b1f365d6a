// The interleaved layout of quant/ggml/interleave.py (what the interleaved tiles read), made from canonical GGML
// blocks at load: the same bytes as that module's torch code, which moves them with strided tensor copies at
// 0.3-0.8 GB/s (seconds for a 7-8B model); here each group of 8 rows is one pass of 4-byte moves, groups spread
// over the kernels' pool. Plain C++: it runs on any CPU the library loads on.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#include "qmatmul.h"
#include "../thread_pool.h"

namespace cpu_quant {

namespace {

// One group's block b: the 8 canonical blocks `src[r]` -> `dst` (interleaved_block_bytes(qtype) bytes).
void interleave_block(int64_t qtype, const uint8_t* const* src, uint8_t* dst) {
  constexpr int R = static_cast<int>(kInterleave);
  if (qtype == kQ4_0) {  // the 8 fp16 scales, then chunk k = 0..3: row r's quant bytes 4k..4k+3 at 4r
    for (int r = 0; r < R; ++r) std::memcpy(dst + 2 * r, src[r], 2);
    for (int k = 0; k < 4; ++k) {
      uint32_t run[R];
      for (int r = 0; r < R; ++r) std::memcpy(&run[r], src[r] + 2 + 4 * k, 4);
      std::memcpy(dst + 16 + 32 * k, run, sizeof(run));
    }
    return;
  }
  // q4_K / q5_K: d (16), dmin (16), the decoded scales by sub-block (64), the mins in pairs (64), q5_K's qh by quad
  // (256), then the quants by chunk j and quad t (1024)
  const bool q5 = qtype == kQ5_K;
  const int64_t qs = q5 ? 48 : 16;         // the quants' offset in a canonical block
  const int64_t out_qs = q5 ? 416 : 160;   // and in the group's block
  for (int r = 0; r < R; ++r) {
    const uint8_t* b = src[r];
    std::memcpy(dst + 2 * r, b, 2);
    std::memcpy(dst + 16 + 2 * r, b + 2, 2);
    const uint8_t* s = b + 4;  // llama.cpp's get_scale_min_k4
    for (int j = 0; j < 8; ++j) {
      const uint8_t sc = j < 4 ? s[j] & 63 : (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      const uint8_t mn = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      dst[32 + 8 * j + r] = sc;
      dst[96 + 16 * (j / 2) + 2 * r + (j % 2)] = mn;
    }
  }
  // The 4-byte quads in destination order (each 32-byte run written whole, one row's quad after the other).
  auto quads = [&](int64_t from, int64_t to, int n) {
    for (int q = 0; q < n; ++q) {
      uint32_t run[R];
      for (int r = 0; r < R; ++r) std::memcpy(&run[r], src[r] + from + 4 * q, 4);
      std::memcpy(dst + to + 32 * q, run, sizeof(run));
    }
  };
  if (q5) quads(16, 160, 8);  // qh: quad t of its 32 bytes
  quads(qs, out_qs, 32);      // the quants: chunk j, quad t at 256j + 32t, i.e. quad 8j + t of the 128 bytes
}

}  // namespace

// canonical: uint8 [N, nb * block bytes] (N a multiple of 8) -> uint8 [N / 8, nb * interleaved block bytes].
at::Tensor ggml_interleave(const at::Tensor& canonical, int64_t qtype) {
  const int64_t gb = interleaved_block_bytes(qtype);
  TORCH_CHECK(gb > 0, "ggml_interleave: qtype ", qtype, " has no interleaved layout");
  TORCH_CHECK(canonical.dim() == 2 && canonical.scalar_type() == at::kByte && canonical.device().is_cpu(),
              "ggml_interleave: canonical must be a CPU uint8 [N, row bytes] tensor");
  const int64_t N = canonical.size(0), rb = canonical.size(1), bb = block_bytes(qtype);
  TORCH_CHECK(N % kInterleave == 0 && rb % bb == 0, "ggml_interleave: N = ", N, " must be a multiple of ",
              kInterleave, " and a row ", rb, " bytes, whole blocks of ", bb);
  const at::Tensor src = canonical.contiguous();
  const int64_t G = N / kInterleave, nb = rb / bb;
  at::Tensor out = at::empty({G, nb * gb}, src.options());
  const uint8_t* s = src.data_ptr<uint8_t>();
  uint8_t* d = out.data_ptr<uint8_t>();
  mistralrs_pool::parallel_for(0, G, std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, nb * gb)),
                               [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* rows[kInterleave];
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t r = 0; r < kInterleave; ++r) rows[r] = s + (g * kInterleave + r) * rb + b * bb;
        interleave_block(qtype, rows, d + g * nb * gb + b * gb);
      }
    }
  });
  return out;
}

}  // namespace cpu_quant
