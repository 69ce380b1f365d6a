// The tiles for W interleaved by 8 rows (quant/ggml/interleave.py), for both instruction sets. Their lanes are
// rows of W (each lane one output, the activations broadcast), so a block's scaling, conversion and fmadd serve 8
// outputs at once. What differs between instruction sets is only how the exact integer dot products are formed,
// the policy P:
// - AVX2 (P::kVnni false): maddubs (4-bit or 5-bit unsigned x signed 8-bit, pairs summed in int16), runs of them
//   added in int16 (no overflow, bounds below), widened to int32 by madd.
// - VNNI (P::kVnni true): P::dpbusd(acc, u8, s8), vpdpbusd's unsigned x signed 8-bit products of 4 added to each
//   int32 lane: no int16 stage. qmatmul_avx512.cpp gives it the 256-bit instruction (AVX-512 VL + VNNI);
//   qmatmul.cpp, for tests on CPUs without it, the same sums through maddubs and madd (exact here: a pair of
//   products of 5-bit quants is at most 2 * 31 * 128 in magnitude).
// Both form the same integers, and everything after them (the fp32 scale products, conversions, fmadds and their
// order) is the same code: the two instruction sets give the same results bit for bit.
//
// This header is included inside each translation unit's anonymous namespace, after its `#pragma GCC target`:
// every function here is local to that unit and compiled for its instruction set (never AVX-512 code reached from
// the AVX2 unit). It needs qmatmul.h (Act, Tile, the formats) and <immintrin.h> included before.

// An opaque identity: keeps the compiler from reassociating integer sums across it (GCC otherwise turns a
// tile's per-row chains of adds into wide trees of partial sums, which spill). "v": any vector register the
// target has (16 on AVX2, 32 with AVX-512).
template <typename V>
ALWAYS_INLINE inline V keep(V v) {
  asm("" : "+v"(v));
  return v;
}

// q4_0 interleaved: per block and group, the 8 rows' fp16 scales, then chunk k = 0..3 (32 bytes, 4 per row) holds
// each row's elements 4k..4k+3 in its low nibbles and 16+4k..16+4k+3 in its high ones. The activations' matching
// 4 bytes are broadcast. AVX2: maddubs gives each row 2 int16 partial sums, the 8 chunks' are added in int16 (each
// at most 2 * 15 * 127 = 3810 in magnitude, 8 of them 30480: no overflow), madd with ones gives the row's int32
// dot product of its nibbles, and adding -8 * sum(y) (c32) makes it the exact integer dot product of (q - 8) and y;
// VNNI: the same integer as 8 vpdpbusd starting from c32. An output's arithmetic: acc = fmadd(fp32(d_w) * d_x,
// float(that integer), acc) per block, in block order, from 0; no horizontal sum. The same in every tile (MR rows
// of x share the unpacked W), so a row's result does not depend on the batch.
template <class P, int MR, int NG>
void tile_q4_0x8(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nb = a.nb, K = a.K;
  __m256 acc[MR][NG];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int g = 0; g < NG; ++g) acc[m][g] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    UNROLL for (int g = 0; g < NG; ++g) {
      const uint8_t* p = w[g] + b * 144;
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      __m256i s[MR];  // AVX2: int16 partial sums; VNNI: the int32 dot products, from -8 * sum(y)
      if constexpr (P::kVnni) {
        UNROLL for (int m = 0; m < MR; ++m) s[m] = _mm256_set1_epi32(a.c32[(m0 + m) * nb + b]);
      }
      // chunk k (k < 4: low nibbles, elements 4k..4k+3; k >= 4: high, 16+4(k-4)..) against the activations'
      // int32 k, one chain of adds per row of x (exact, so the order does not matter)
      UNROLL for (int k = 0; k < 8; ++k) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 + 32 * (k & 3)));
        const __m256i q = k < 4 ? _mm256_and_si256(raw, m4) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        UNROLL for (int m = 0; m < MR; ++m) {
          const int32_t* y = reinterpret_cast<const int32_t*>(a.qs + (m0 + m) * K + b * kQK);
          if constexpr (P::kVnni) {
            s[m] = keep(P::dpbusd(s[m], q, _mm256_set1_epi32(y[k])));
          } else {
            const __m256i p16 = _mm256_maddubs_epi16(q, _mm256_set1_epi32(y[k]));
            s[m] = k == 0 ? p16 : keep(_mm256_add_epi16(s[m], p16));
          }
        }
      }
      UNROLL for (int m = 0; m < MR; ++m) {
        const int64_t ab = (m0 + m) * nb + b;
        __m256i i32 = s[m];
        if constexpr (!P::kVnni) i32 = _mm256_add_epi32(_mm256_madd_epi16(s[m], ones), _mm256_set1_epi32(a.c32[ab]));
        const __m256 dd = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[ab]));
        acc[m][g] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(i32), acc[m][g]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int g = 0; g < NG; ++g)
    _mm256_storeu_ps(out + (m * NG + g) * kInterleave, acc[m][g]);
}

// q4_K (HB = false) and q5_K (HB = true) interleaved (per block and group, the 8 rows' d and dmin, their decoded
// 6-bit scales by sub-block, their mins in pairs, q5_K's high bits by quad, then chunk j's quads t: row r's quant
// bytes 32j + 4t .. at 4r). Per sub-block (the low or high nibbles of chunk j, q5_K's fifth bit ORed in), the 8
// quads against the activations' matching 4 bytes broadcast give each row scale * (q . y) exactly in int32:
// AVX2: maddubs, added in int16 (q4_K: 8 of them, at most 8 * 2 * 15 * 127 = 30480; q5_K: runs of 4, at most
// 4 * 2 * 31 * 127 = 31496: no overflow), madd with the row's scale in both int16 lanes of its pair; VNNI: 8
// vpdpbusd from 0, times the row's scale (int32 lanes). sumi is their sum over the sub-blocks; msum = sum over
// sub-blocks of min * bsum32 (madd of the mins' pairs with the activations' pairs of sums). An output's
// arithmetic: acc = fmadd(fp32(d) * d_x, float(sumi), acc), then acc = fnmadd(fp32(dmin) * d_x, float(msum),
// acc), per block, in block order, from 0; no horizontal sum. The same in every tile, so a row's result does not
// depend on the batch.
template <class P, int MR, int NG, bool HB>
void tile_q45_Kx8(const Act& a, int64_t m0, const uint8_t* const* w, float* out) {
  constexpr int64_t kGB = interleaved_block_bytes(HB ? kQ5_K : kQ4_K);
  constexpr int64_t kQs = HB ? 416 : 160;  // the quants' offset in a group's block
  constexpr int kRun = P::kVnni ? 8 : HB ? 4 : 8;  // quads added before each widening (AVX2: in int16)
  const __m256i hbit = _mm256_set1_epi8(0x10);
  constexpr int64_t kPrefetchBlocks = 2;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const int64_t nb = a.nb, K = a.K;
  __m256 acc[MR][NG];
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int g = 0; g < NG; ++g) acc[m][g] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    UNROLL for (int g = 0; g < NG; ++g) {
      const uint8_t* p = w[g] + b * kGB;
      // Each row of x's activations for this block, one pointer (the broadcasts are constant offsets from it). With
      // two groups it is opaque per group: GCC otherwise computes the 64 broadcasts (or their 64 addresses) once
      // and spills them for the next group, a store and a reload where a broadcast load does.
      const int8_t* yrow[MR];
      UNROLL for (int m = 0; m < MR; ++m) {
        yrow[m] = a.qs + (m0 + m) * K + b * kQKK;
        if constexpr (NG > 1) asm("" : "+r"(yrow[m]));
      }
      if constexpr (MR <= 2) {  // decode reads W from DRAM: the block after next, all its lines
        UNROLL for (int l = 0; l < (kGB + 63) / 64 + 1; ++l)
          _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBlocks * kGB + 64 * l), _MM_HINT_T0);
      }
      __m256i sumi[MR];
      UNROLL for (int m = 0; m < MR; ++m) sumi[m] = _mm256_setzero_si256();
      UNROLL for (int j = 0; j < 4; ++j) {
        UNROLL for (int half = 0; half < 2; ++half) {  // low nibbles: sub-block 2j; high: 2j + 1
          const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 32 + 8 * (2 * j + half)));
          // AVX2: row r's scale in int16 2r and 2r + 1 (madd's pairs); VNNI: in int32 r
          const __m256i sc = P::kVnni ? _mm256_cvtepu8_epi32(s8) : _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(s8, s8));
          __m256i part[MR];
          UNROLL for (int t = 0; t < 8; ++t) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kQs + 256 * j + 32 * t));
            __m256i q = half ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4) : _mm256_and_si256(raw, m4);
            if constexpr (HB) {  // bit 2j + half of the quad's qh bytes, moved to bit 4
              const int bit = 2 * j + half;
              const __m256i hr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 160 + 32 * t));
              const __m256i hs = bit <= 4 ? _mm256_slli_epi16(hr, 4 - bit) : _mm256_srli_epi16(hr, bit - 4);
              q = _mm256_or_si256(q, _mm256_and_si256(hs, hbit));
            }
            UNROLL for (int m = 0; m < MR; ++m) {
              const int32_t* y = reinterpret_cast<const int32_t*>(yrow[m] + 64 * j + 32 * half);
              const __m256i yb = _mm256_set1_epi32(y[t]);
              if constexpr (P::kVnni) {
                part[m] = keep(P::dpbusd(t == 0 ? _mm256_setzero_si256() : part[m], q, yb));
              } else {
                const __m256i p16 = _mm256_maddubs_epi16(q, yb);
                part[m] = t % kRun == 0 ? p16 : keep(_mm256_add_epi16(part[m], p16));
              }
              if (t % kRun == kRun - 1) {
                const __m256i scaled = P::kVnni ? _mm256_mullo_epi32(part[m], sc) : _mm256_madd_epi16(part[m], sc);
                sumi[m] = keep(_mm256_add_epi32(sumi[m], scaled));
              }
            }
          }
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      const __m256 dmw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
      __m256i mins[4];  // pair q: row r's mins 2q, 2q + 1 in int16 2r, 2r + 1
      UNROLL for (int q = 0; q < 4; ++q)
        mins[q] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 96 + 16 * q)));
      UNROLL for (int m = 0; m < MR; ++m) {
        const int64_t ab = (m0 + m) * nb + b;
        const int32_t* bs = reinterpret_cast<const int32_t*>(a.bs32 + ab * 8);  // the sums of 32, in pairs
        __m256i ms = _mm256_madd_epi16(mins[0], _mm256_set1_epi32(bs[0]));
        UNROLL for (int q = 1; q < 4; ++q) ms = _mm256_add_epi32(ms, _mm256_madd_epi16(mins[q], _mm256_set1_epi32(bs[q])));
        const __m256 dx = _mm256_set1_ps(a.d[ab]);
        acc[m][g] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(sumi[m]), acc[m][g]);
        acc[m][g] = _mm256_fnmadd_ps(_mm256_mul_ps(dmw, dx), _mm256_cvtepi32_ps(ms), acc[m][g]);
      }
    }
  }
  UNROLL for (int m = 0; m < MR; ++m) UNROLL for (int g = 0; g < NG; ++g)
    _mm256_storeu_ps(out + (m * NG + g) * kInterleave, acc[m][g]);
}

// The tile for MR rows of x: the GEMV (one row of x) takes two groups of 8 rows of W (independent accumulators,
// and one stream through W each), more rows of x one group (its unpacked quants are used by every row of x).
// MR goes up to P::kGemmRows, the rows of x per GEMM tile: 4 on AVX2 (16 vector registers), 8 with AVX-512's 32.
// (q4_K's AVX2 GEMV, DRAM-bound with two threads, was as fast with one group or two, with or without prefetching
// further ahead, within the VM's noise; one thread: +20% on the canonical tile.)
template <class P, int MR>
Tile interleaved_tile_for(int64_t qtype) {
  constexpr int NG = MR == 1 ? 2 : 1;
  if (qtype == kQ4_K) return {&tile_q45_Kx8<P, MR, NG, false>, NG};
  if (qtype == kQ5_K) return {&tile_q45_Kx8<P, MR, NG, true>, NG};
  return {&tile_q4_0x8<P, MR, NG>, NG};
}

template <class P, int... MRs>
Tile interleaved_tile_of(int64_t qtype, int64_t mr, std::integer_sequence<int, MRs...>) {
  Tile tile{nullptr, 0};
  ((mr == MRs + 1 ? (tile = interleaved_tile_for<P, MRs + 1>(qtype), true) : false) || ...);
  return tile;
}

// (mr: 1 .. P::kGemmRows)
template <class P>
Tile interleaved_tiles(int64_t qtype, int64_t mr) {
  return interleaved_tile_of<P>(qtype, mr, std::make_integer_sequence<int, P::kGemmRows>{});
}
