// The vectorised inner loops of the CPU attention kernels, as a table of functions with one
// implementation per instruction set (AVX-512F and AVX2+FMA on x86-64, portable C++
// elsewhere), chosen once at run time: the extension then runs on any CPU, at full speed
// where the wide instructions exist.
//
// Legend: M, N, K the sizes of a tile product C[M, N] = A[M, K] B[K, N]; W floats per vector.
// All buffers are fp32. Rows handed to these functions are padded to a multiple of kPad
// floats (the callers' buffers are allocated so), which keeps every loop free of tails.
#pragma once

#include <cstdint>

namespace nbp_mega::cpu {

constexpr int64_t kPad = 16;  // floats: one AVX-512 register; widths are rounded up to this

// The softmax loops work in base 2 (p = 2^(x log2 e) = e^x): folding log2(e) into the score
// scale leaves one FMA per score before the exponential and no multiply by ln 2 inside it.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct TileKernels {
  const char* isa;  // "avx512", "avx2" or "generic": `python -m nbp_mega.ops --info` says it

  // C[M, N] (+)= A[M, K] B[K, N]. A element (i, k) is a[i * a_row + k * a_col], so A may be
  // a transposed view; B is row-major with row stride ldb; C row-major with row stride ldc.
  // N must be a multiple of kPad.
  void (*gemm)(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row, int64_t a_col,
               const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

  // Online-softmax step for one query row of a forward tile, in base 2: scale2 = scale *
  // log2(e). s[0, width) holds raw scores, of which [0, visible) are visible. With the running
  // max *m of scale2 * score and the running sum *l, overwrites s with
  // p = 2^(scale2 * s - m_new) (0 past `visible`), updates *m and *l and returns
  // alpha = 2^(m_old - m_new), the factor for the row's output accumulator.
  float (*softmax_step)(float* s, int64_t visible, int64_t width, float scale2, float* m,
                        float* l);

  // Backward, one key row of a transposed tile: s[c] = 2^(scale2 * s[c] - lse2[c]) for
  // c in [hidden, visible_end) and 0 elsewhere in [0, width); lse2 = lse * log2(e).
  void (*probs)(float* s, const float* lse2, int64_t hidden, int64_t visible_end,
                int64_t width, float scale2);

  // Backward: dp[c] = p[c] * (dp[c] - delta[c]) for c in [0, width).
  void (*dscores)(float* dp, const float* p, const float* delta, int64_t width);

  // x[c] *= alpha for c in [0, width).
  void (*scale)(float* x, int64_t width, float alpha);

  // The sampler's softmax numerators: x[c] = 2^((x[c] - shift) * scale2) for c in [0, n)
  // (any n; x[c] <= shift, so each is in [0, 1], and exactly 0 far below), returning their sum.
  float (*exp2_sum)(float* x, int64_t n, float shift, float scale2);

  // The sampler's top-k prefilter: of x[0, n), the order keys (float bits mapped to uint32 in
  // the floats' order) that are >= floor, with their indices, in order, into keys[] and ids[]
  // (room for their count + kPad: whole vectors are stored); returns the count. *lo and *hi
  // become the smallest and largest key of all n.
  int64_t (*keys_at_least)(const float* x, int64_t n, uint32_t floor, uint32_t* keys,
                           int32_t* ids, uint32_t* lo, uint32_t* hi);

  // The sampler's later compactions: of keys[0, n), those in [lo, hi], in order, into out[]
  // and, if out_ids, their ids (ids[j], or j without ids) into out_ids[] (room for their
  // count + kPad, as above; out may be keys itself, out_ids ids). Returns the count.
  int64_t (*keys_between)(const uint32_t* keys, const int32_t* ids, int64_t n, uint32_t lo,
                          uint32_t hi, uint32_t* out, int32_t* out_ids);
};

// The implementations. avx512_kernels() / avx2_kernels() are nullptr where the build or the
// CPU lacks AVX-512F / AVX2+FMA.
const TileKernels& generic_kernels();
const TileKernels* avx2_kernels();
const TileKernels* avx512_kernels();

// The fastest table this CPU runs (decided once; NBP_CPU_ISA=generic forces the portable one).
const TileKernels& tile_kernels();

}  // namespace nbp_mega::cpu
