// Just enough of CUDA, on the CPU, to run the thread-block programs of csrc/cuda/ (which can
// only be compiled, never run, on a machine without a GPU): each thread of a block is a
// std::thread, __syncthreads() a std::barrier, and nvcuda::wmma a 16 x 16 product done by
// lane 0 of the warp (fragments are opaque on the GPU too: nothing else may read them).
// T is float, or a float holding an fp16/bf16 value (harness.cpp): products of T are exact in
// fp32 and summed in fp32, as on tensor cores, so the emulation also rounds where the GPU does.
//
// Also checked, as the GPU would require: wmma pointers aligned to 32 bytes of the real
// 16-bit operand (16 elements) or fp32 accumulator (8 elements); leading dimensions multiples
// of 8 (operands) and 4 (accumulators).
#pragma once

#define NBP_CUDA_EMULATION 1

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <type_traits>
#include <vector>

#define __device__
#define __host__
#define __forceinline__ inline

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx;
inline thread_local std::barrier<>* emulated_block_barrier = nullptr;

inline void __syncthreads() { emulated_block_barrier->arrive_and_wait(); }

inline float atomicAdd(float* address, float value) {
  return std::atomic_ref<float>(*address).fetch_add(value);
}

inline void emulation_check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "CUDA emulation: %s\n", what);
    std::abort();
  }
}

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float x[16][16];  // the logical tile; meaningful in lane 0 of the warp only
};

inline bool lane0() { return threadIdx.x % 32 == 0; }

inline void check_pointer(const void* p, unsigned ld, bool accumulator) {
  // Operands are 2-byte types on the GPU: 32 bytes = 16 elements = 64 bytes of float here.
  emulation_check(reinterpret_cast<uintptr_t>(p) % (accumulator ? 32 : 64) == 0,
                  "wmma pointer not 256-bit aligned");
  emulation_check(ld % (accumulator ? 4 : 8) == 0, "wmma leading dimension not allowed");
}

template <class Use, class T, class Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ld) {
  check_pointer(p, ld, false);
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r][c] = static_cast<float>(std::is_same_v<Layout, row_major> ? p[r * ld + c]
                                                                        : p[r + c * ld]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ld, layout_t layout) {
  check_pointer(p, ld, true);
  emulation_check(layout == mem_row_major, "only row-major accumulators are emulated");
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r][c] = p[r * ld + c];
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ld, layout_t layout) {
  check_pointer(p, ld, true);
  emulation_check(layout == mem_row_major, "only row-major accumulators are emulated");
  if (!lane0()) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ld + c] = f.x[r][c];
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float value) {
  for (auto& row : f.x)
    for (float& x : row) x = value;
}

template <class A, class B>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const A& a, const B& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  if (!lane0()) return;
  float out[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i][j];
      for (int k = 0; k < 16; ++k) sum += a.x[i][k] * b.x[k][j];
      out[i][j] = sum;
    }
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) d.x[i][j] = out[i][j];
}

}  // namespace nvcuda::wmma

// Runs block(x, y, smem) for every block of a gx x gy grid, one block at a time, each with
// `threads` std::threads. Shared memory starts as NaN, so a read before any write shows.
inline void emulate_grid(int64_t gx, int64_t gy, int threads, size_t smem_bytes,
                         const std::function<void(int64_t, int64_t, char*)>& block) {
  std::vector<float> smem((smem_bytes + 127) / sizeof(float) + 128);
  char* base = reinterpret_cast<char*>(smem.data());
  base += (128 - reinterpret_cast<uintptr_t>(base) % 128) % 128;
  for (int64_t y = 0; y < gy; ++y)
    for (int64_t x = 0; x < gx; ++x) {
      std::fill(smem.begin(), smem.end(), std::nanf(""));
      std::barrier<> barrier(threads);
      std::vector<std::thread> team;
      for (int t = 0; t < threads; ++t)
        team.emplace_back([&, t] {
          threadIdx.x = t;
          emulated_block_barrier = &barrier;
          block(x, y, base);
        });
      for (auto& thread : team) thread.join();
    }
}
