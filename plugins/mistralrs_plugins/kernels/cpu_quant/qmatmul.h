// Shared by the quantized matmul's two instruction sets (qmatmul.cpp: AVX2, the activation quantization and
// the driver; qmatmul_avx512.cpp: the AVX-512 VNNI tiles): the block formats, the quantized activations
// handed to a tile, and what a tile is. Included before any `#pragma GCC target`, so that everything defined
// here is compiled for AVX2 in both translation units (one definition, never AVX-512 code on an AVX2 CPU).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx2_common.h"

namespace cpu_quant {

// ---- formats --------------------------------------------------------------------------------------

enum QType : int64_t { kQ4_0 = 0, kQ8_0 = 1, kQ4_K = 2, kQ5_K = 3, kQ6_K = 4, kAF4 = 5, kAF8 = 6 };
constexpr int kNumQTypes = 7;

// Affine groups (kAF4, kAF8: AWQ, asymmetric GPTQ, MLX/AFQ): w = s * q + b with unsigned 4- or 8-bit codes q and
// fp32 (s, b) per group of consecutive weights of a row. A row is laid out in super-blocks of 128 weights (the
// last one zero-padded): the codes, then `pairs` scales, then `pairs` offsets (fp32), one pair per 128 / pairs
// weights (pairs = 4, 2, 1 for groups of 32, 64, >= 128). Codes: super-block byte 16j + i (j < 4, i < 16) holds
// element 32j + i (4-bit: low nibble; q4_0's order) and element 32j + 16 + i (4-bit: high nibble; 8-bit: byte
// 64 + 16j + i), which is the order of the quantized activations' VNNI groups, so a tile unpacks with masks only.
constexpr int64_t kAffineSB = 128;
ALWAYS_INLINE inline bool is_affine(int64_t t) { return t == kAF4 || t == kAF8; }
ALWAYS_INLINE inline bool is_kquant(int64_t t) { return t >= kQ4_K && t <= kQ6_K; }
ALWAYS_INLINE inline int64_t affine_sb_bytes(int64_t t, int64_t pairs) { return (t == kAF4 ? 64 : 128) + 8 * pairs; }

constexpr int64_t kQK = 32;    // q4_0 / q8_0 block
constexpr int64_t kQKK = 256;  // k-quant super-block

// (The affine types quantize their activations as q8_0: blocks of 32.)
ALWAYS_INLINE inline int64_t block_elems(int64_t t) { return t <= kQ8_0 || is_affine(t) ? kQK : kQKK; }
ALWAYS_INLINE inline int64_t block_bytes(int64_t t) {
  switch (t) {
    case kQ4_0: return 18;   // fp16 d, 16 bytes of nibbles
    case kQ8_0: return 34;   // fp16 d, 32 int8
    case kQ4_K: return 144;  // fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    case kQ5_K: return 176;  // as q4_K + 32 bytes of high bits (before the nibbles)
    case kQ6_K: return 210;  // 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, fp16 d
    default: return 0;
  }
}

ALWAYS_INLINE inline float fp16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// ---- quantized activations ---------------------------------------------------------------------------

// All rows of x, quantized (the same values for both instruction sets; what differs is only the layout the
// tiles read them in).
// q8_0 (q4_0/q8_0 weights): qs [M][K], d [M][nb] (the fp16-rounded scale as fp32), c [M][nb][8] (AVX2 q4_0:
// c[i] = 8 * (y[2i] + y[2i+1] + y[16+2i] + y[17+2i]), the q4_0 offset times the pairs of pairs that the AVX2
// q4_0 tile sums in int16).
// q8_K (k-quants): qs [M][K], d [M][nb], bs16 [M][nb][16] (sums of 16), bs32 [M][nb][8] (sums of 32).
// The AVX-512 VNNI layout (vnni = true) is group-major (the rows of x next to each other for each group of
// blocks, so that a tile reaches all its rows through one pointer) and 64-byte aligned; ngroups groups of
// kVnniGroup[t] blocks (q4_0/q8_0: 4 blocks, the last group padded with zero blocks; k-quants: 1 super-block):
// - vq [ngroups][M][128 or 256]: the quants. q4_0/q8_0: the first 16 bytes of the group's 4 blocks, then their
//   last 16; q4_K/q5_K: the super-block's sub-blocks of 32 in the order 0 2 1 3 4 6 5 7 (the order the nibbles
//   of 64 consecutive bytes hold them); q6_K: as they are.
// - vaux, per group (vaux_stride bytes): q4_0/q8_0, [M][128 bytes]: 4 int32 offsets per block that the unsigned
//   dot products start from (lane l meets y[4l..4l+3] and y[16+4l..16+4l+3]: -8 (q4_0) or -128 (q8_0) times
//   their sum), then the block scales repeated 4 times (fp32). k-quants, so that a tile loads several rows'
//   values at once: d [M] (fp32), from byte kaux_bs32 the 8 sums of 32 [M][8] (int16), from byte kaux_bs16 the
//   16 sums of 16 [M][16]. Affine, [M][128 bytes]: per lane (4 per block, lane l meets y[4l..4l+3] and
//   y[16+4l..16+4l+3]) d * the sum of its 8 quants (fp32), then the block scales repeated 4 times (fp32).
struct Act {
  int64_t K = 0, nb = 0;
  const int8_t* qs = nullptr;
  const float* d = nullptr;
  const float* ys = nullptr;      // affine (AVX2): d * sum(qs) per block [M][nb]
  int64_t pairs = 0;              // affine: (s, b) pairs per super-block of W
  const int16_t* c = nullptr;     // AVX2 q4_0
  const int32_t* c32 = nullptr;   // interleaved q4_0: -8 * sum(y) per block [M][nb]
  const int16_t* bs16 = nullptr;  // k-quants
  const int16_t* bs32 = nullptr;  // k-quants
  // AVX-512 VNNI layout
  int64_t M = 0, ngroups = 0;
  const int8_t* vq = nullptr;
  const uint8_t* vaux = nullptr;
  int64_t vaux_stride = 0, kaux_bs32 = 0, kaux_bs16 = 0;
};

constexpr int64_t kVnniQ0Blocks = 4;  // q4_0/q8_0 blocks per group of the VNNI layout
ALWAYS_INLINE inline int64_t vnni_group_bytes(int64_t t) { return t <= kQ8_0 || is_affine(t) ? 128 : 256; }
// vaux bytes per group for M rows of x, and the offsets of the k-quants' sums (see Act).
ALWAYS_INLINE inline int64_t vnni_bs32_offset(int64_t M) { return (M * 4 + 63) / 64 * 64; }
ALWAYS_INLINE inline int64_t vnni_bs16_offset(int64_t M) { return vnni_bs32_offset(M) + M * 16; }
ALWAYS_INLINE inline int64_t vnni_aux_stride(int64_t t, int64_t M) {
  return t <= kQ8_0 || is_affine(t) ? 128 * M : (vnni_bs16_offset(M) + M * 32 + 63) / 64 * 64;
}

// The 8 6-bit scales (bytes 0..7 of the result) and 8 6-bit mins (bytes 8..15) of a q4_K/q5_K block from
// its 12 scale bytes s (llama.cpp's get_scale_min_k4): scale j < 4 is s[j] & 63, min j < 4 is s[j+4] & 63;
// scale j >= 4 is (s[j+4] & 15) | (s[j-4] >> 6) << 4, min j >= 4 is (s[j+4] >> 4) | (s[j] >> 6) << 4.
// Reads 16 bytes at s12 (the 4 after the scales are the block's next field).
ALWAYS_INLINE inline __m128i kquant_scales_mins(const uint8_t* s12) {
  const __m128i s = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s12));
  // low parts: [s0..s3 | s8..s11 | s4..s7 | s8..s11], the last group's taken from its high nibbles
  const __m128i a = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i lo = _mm_and_si128(_mm_blend_epi32(a, _mm_srli_epi16(a, 4), 0x8),
                                   _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
  // high parts of scales/mins 4..7: the top 2 bits of s0..s3 / s4..s7, to bits 4..5
  const __m128i b = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
  return _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(b, 2), _mm_set1_epi8(0x30)));
}

// ---- tiles ------------------------------------------------------------------------------------------

// A tile: MR rows of x (m0 ..) against `rows` rows of W. It gets the row pointers of W (a tail repeats the
// last row; its results are not stored) and writes the raw sums (before bias) to out[m * rows + g]. What is
// computed for one output never depends on MR, the rows of W or the other rows in the tile.
using TileFn = void (*)(const Act&, int64_t m0, const uint8_t* const* w, float* out);
struct Tile {
  TileFn fn;
  int rows;  // rows of W per call
};

// One instruction set's tiles and schedule: `tile(qtype, mr, K)` for mr = 1..max(gemv_rows, gemm_rows[qtype]) (K may
// pick how many rows of W a tile takes, never its arithmetic per output); M up
// to gemv_rows is one pass over W with all rows of x in the tile (decode), larger M goes in tiles of
// gemm_rows[qtype] over L2-sized panels of W (prefill). `vnni`: the tiles read the AVX-512 VNNI layout.
// `interleaved(qtype, mr)`: the tiles for W interleaved by kInterleave rows (quant/ggml/interleave.py; nullptr
// where the instruction set has none); their `rows` count groups of kInterleave rows, and w[] points at groups.
struct Kernels {
  Tile (*tile)(int64_t qtype, int64_t mr, int64_t K);
  int gemv_rows;
  int gemm_rows[kNumQTypes];
  bool vnni;
  Tile (*interleaved)(int64_t qtype, int64_t mr) = nullptr;  // an InterleavedTiles
  int interleaved_gemm_rows = 0;
};

constexpr int64_t kInterleave = 8;  // rows of W per group of the interleaved layout
// Bytes per block of a group of the interleaved layout (interleave.py's GROUP_BLOCK_BYTES); 0: no such layout.
constexpr int64_t interleaved_block_bytes(int64_t t) {
  return t == kQ4_0 ? 144 : t == kQ4_K ? 1184 : t == kQ5_K ? 1440 : 0;
}

// Rows of x per GEMM tile of the VNNI interleaved tiles (their 32 vector registers hold 8 rows' sums).
constexpr int kVnniInterleavedGemmRows = 8;

constexpr int kMaxTileRowsOfX = 16;  // the largest mr any instruction set's tile() takes
constexpr int kMaxGroup = 8;        // rows of W per tile call, at most
constexpr int kMaxUnitGroups = 4;   // groups of interleaved rows per tile call, at most

// qmatmul_avx512.cpp: the AVX-512 VNNI tiles. Only call them where cpu_has_avx512_vnni() is true.
Kernels avx512_vnni_kernels();

// qmatmul_avxvnni.cpp: the interleaved tiles with AVX-VNNI; nullptr where the CPU or the compiler lacks it.
using InterleavedTiles = Tile (*)(int64_t qtype, int64_t mr);
InterleavedTiles avxvnni_interleaved_tiles();

}  // namespace cpu_quant
