// Building blocks of the CUDA attention kernels: a thread block of kThreads threads (kWarps
// warps) works on tiles in shared memory; every step is a loop of the whole block over the
// elements (or 16 x 16 fragments) of a tile, separated by __syncthreads(). No per-thread
// state outlives a step, so the kernels are correct for any mapping of work to threads.
//
// Legend: T the element type of the inputs (__half or __nv_bfloat16; float in the CPU
// emulation of tests/ops/cuda_emulation); M, N, K the sizes of C[M, N] (+)= A[M, K] B[K, N];
// ld the row stride (leading dimension) of a tile in shared memory, in elements.
//
// Compiled by nvcc, or by a host C++ compiler after tests/ops/cuda_emulation/emulation.h,
// which provides threadIdx, __syncthreads, atomicAdd and nvcuda::wmma on the CPU.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#elif !defined(NBP_CUDA_EMULATION)
#error "compile with nvcc, or include tests/ops/cuda_emulation/emulation.h first"
#endif

namespace nbp_mega::cuda {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kFrag = 16;  // wmma fragments are 16 x 16 (x 16 deep)

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// fp32 -> T, rounding to nearest (even), as the kernels store probabilities and outputs.
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
#if defined(__CUDACC__)
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
#endif

// Consecutive buffers carved out of dynamic shared memory, each aligned to 128 bytes (wmma
// wants 32). Constructed with base 0 on the host, it only measures: bytes() is what to launch
// the kernel with.
class SmemLayout {
 public:
  __host__ __device__ explicit SmemLayout(uintptr_t base) : base_(base) {}
  template <class U>
  __host__ __device__ U* take(size_t count) {
    const size_t at = (used_ + 127) / 128 * 128;
    used_ = at + count * sizeof(U);
    return reinterpret_cast<U*>(base_ + at);
  }
  __host__ __device__ size_t bytes() const { return used_; }

 private:
  uintptr_t base_;
  size_t used_ = 0;
};

// tile[r, c] = src[r * stride + c] for r < rows and c < d; 0 in the rest of [0, R) x [0, DP).
// The zeros keep padded rows and columns out of every product.
template <int R, int DP, class T>
__device__ __forceinline__ void load_tile(const T* src, int64_t stride, int rows, int d, T* tile,
                                          int ld) {
  for (int i = threadIdx.x; i < R * DP; i += kThreads) {
    const int r = i / DP, c = i % DP;
    tile[r * ld + c] = r < rows && c < d ? src[r * stride + c] : from_float<T>(0.f);
  }
}

// dst[r * stride + c] = scale * tile[r, c] (fp32) for r < rows and c < d.
template <int R, int DP, class T>
__device__ __forceinline__ void store_tile(const float* tile, int ld, float scale, int rows,
                                           int d, T* dst, int64_t stride) {
  for (int i = threadIdx.x; i < R * DP; i += kThreads) {
    const int r = i / DP, c = i % DP;
    if (r < rows && c < d) dst[r * stride + c] = from_float<T>(scale * tile[r * ld + c]);
  }
}

template <int R, int C>
__device__ __forceinline__ void zero_tile(float* tile, int ld) {
  for (int i = threadIdx.x; i < R * C; i += kThreads) tile[i / C * ld + i % C] = 0.f;
}

// Where element (row, col) of a matrix stored in `Layout` with leading dimension ld is.
template <class Layout>
__device__ __forceinline__ int offset(int row, int col, int ld);
template <>
__device__ __forceinline__ int offset<wmma::row_major>(int row, int col, int ld) {
  return row * ld + col;
}
template <>
__device__ __forceinline__ int offset<wmma::col_major>(int row, int col, int ld) {
  return row + col * ld;
}

// C[M, N] (+)= A[M, K] B[K, N] on tensor cores, fp32 accumulation. A and B are T tiles in
// shared memory, each row- or column-major (a column-major A is the transpose of a row-major
// tile: A(i, k) = a[i + k * lda]); C is fp32, row-major. Warp w computes the output fragments
// w, w + kWarps, ... (row-major over the M/16 x N/16 grid): each fragment is one warp's, so
// no two warps write the same element. The caller synchronises before reading C.
template <int M, int N, int K, class LayoutA, class LayoutB, bool kAccumulate, class T>
__device__ __forceinline__ void block_mma(const T* a, int lda, const T* b, int ldb, float* c,
                                          int ldc) {
  static_assert(M % kFrag == 0 && N % kFrag == 0 && K % kFrag == 0, "tiles of 16");
  constexpr int kCols = N / kFrag, kFrags = M / kFrag * kCols;
  for (int f = threadIdx.x / 32; f < kFrags; f += kWarps) {  // uniform across a warp
    const int i = f / kCols * kFrag, j = f % kCols * kFrag;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
    if (kAccumulate) {
      wmma::load_matrix_sync(acc, c + i * ldc + j, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
    for (int k = 0; k < K; k += kFrag) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, LayoutB> fb;
      wmma::load_matrix_sync(fa, a + offset<LayoutA>(i, k, lda), lda);
      wmma::load_matrix_sync(fb, b + offset<LayoutB>(k, j, ldb), ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + i * ldc + j, acc, ldc, wmma::mem_row_major);
  }
}

}  // namespace nbp_mega::cuda
