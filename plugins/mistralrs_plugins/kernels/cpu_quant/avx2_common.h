// Shared by the AVX2 kernels of this plugin (qmatmul.cpp, linear_bf16.cpp): forced inlining, unrolling,
// and the fixed horizontal-sum trees every schedule reduces with (batch invariance depends on them).
#pragma once

#include <immintrin.h>

#define ALWAYS_INLINE __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 16")

namespace cpu_quant {

ALWAYS_INLINE inline float hsum4(__m128 r) {
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

ALWAYS_INLINE inline float hsum8(__m256 v) {
  return hsum4(_mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v)));
}

}  // namespace cpu_quant
