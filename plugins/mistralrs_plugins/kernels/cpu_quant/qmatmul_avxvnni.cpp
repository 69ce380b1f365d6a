// The interleaved tiles (qmatmul_interleaved.h) with AVX-VNNI: the VEX-encoded 256-bit vpdpbusd of AVX2 CPUs that
// have it without AVX-512 (Intel's client cores from Alder Lake on). The VNNI arithmetic of that header, so the
// AVX2 op's results bit for bit; qmatmul.cpp's op qmatmul_avxvnni runs them through the AVX2 driver where the CPU
// has the instructions (checked at run time here). With 16 vector registers, GEMM tiles of 4 rows of x, as AVX2's.
//
// Compilers that do not know the instruction set (GCC < 11, clang < 12) build this unit without the tiles, and the
// op keeps the AVX2 ones. Nothing here runs at load time: the library loads on every AVX2 CPU.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "qmatmul.h"

#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")

namespace {

using namespace cpu_quant;

#include "qmatmul_interleaved.h"

struct AvxVnni {
  static constexpr bool kVnni = true;
  static constexpr int kGemmRows = 4;
  ALWAYS_INLINE static __m256i dpbusd(__m256i acc, __m256i u, __m256i s) { return _mm256_dpbusd_avx_epi32(acc, u, s); }
};

}  // namespace

namespace cpu_quant {

InterleavedTiles avxvnni_interleaved_tiles() {
  return __builtin_cpu_supports("avxvnni") ? &interleaved_tiles<AvxVnni> : nullptr;
}

}  // namespace cpu_quant

#pragma GCC pop_options

#else

namespace cpu_quant {

InterleavedTiles avxvnni_interleaved_tiles() { return nullptr; }

}  // namespace cpu_quant

#endif
