// The CUDA kernels' thread-block programs (csrc/cuda/attention_blocks.cuh) on the CPU, as a C
// library for tests/ops/test_cuda_emulated.py (ctypes). Launches mirror
// csrc/cuda/attention_kernels.cu: the same grids, block order and shared-memory sizes.
//
// Legend: B batch; N heads; H = B * N; Sq queries; Sk keys; d head dim; L block length;
// P prefix length. A View is a [B, N, S, d] float32 tensor with unit stride over d.
//
// Element types (argument `dtype`): 0 float; 1 Half and 2 BFloat16, a float holding a value
// of that type (so float32 tensors of values already rounded to it are passed in) which
// from_float rounds to nearest even, as __float2half_rn / __float2bfloat16_rn do.
#include <cstring>

#include "emulation.h"

#include "cuda/attention_blocks.cuh"

struct Half {
  float value;
  explicit operator float() const { return value; }
};

struct BFloat16 {
  float value;
  explicit operator float() const { return value; }
};

namespace nbp_mega::cuda {
template <>
inline Half from_float<Half>(float x) {
  return {static_cast<float>(static_cast<_Float16>(x))};
}
template <>
inline BFloat16 from_float<BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return {x};  // NaN
  bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&x, &bits, sizeof bits);
  return {x};
}
}  // namespace nbp_mega::cuda

namespace nc = nbp_mega::cuda;

template <class F>
static void with_dtype(int dtype, F&& f) {
  if (dtype == 0) {
    f(float{});
  } else if (dtype == 1) {
    f(Half{});
  } else {
    f(BFloat16{});
  }
}

extern "C" {

struct View {
  float* data;
  int64_t stride_b, stride_n, stride_s;
};

}  // extern "C"

template <class T>
static nc::HeadTensor<T> heads(View x, int64_t n) {
  static_assert(sizeof(T) == sizeof(float), "element types are floats here");
  return {reinterpret_cast<T*>(x.data), x.stride_b, x.stride_n, x.stride_s, n};
}

extern "C" {

// Returns 0, or 1 if d is larger than the kernels take.
int emulated_forward(View q, View k, View v, View o, float* lse, int64_t B, int64_t N,
                     int64_t sq, int64_t sk, int64_t d, int64_t L, int64_t P, int64_t q_offset,
                     float scale, int dtype) {
  bool ok = false;
  with_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    const nc::ForwardArgs<T> a{heads<const T>(q, N), heads<const T>(k, N), heads<const T>(v, N),
                               heads<T>(o, N), lse, {sq, sk, L, P, q_offset}, B * N,
                               static_cast<int>(d), scale};
    const int64_t tiles = nbp_mega::ceil_div(sq, nc::kFwdBQ);
    ok = nc::with_head_dim(d, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const size_t bytes = nc::ForwardTiles<T, DP>(0).bytes;
      emulate_grid(B * N, tiles, nc::kThreads, bytes, [&](int64_t x, int64_t y, char* smem) {
        nc::forward_block<T, DP>(a, x, tiles - 1 - y, smem);
      });
    });
  });
  return ok ? 0 : 1;
}

// grad_q (float32) must be zeroed (the kernel adds into it); lse and delta are [H, Sq]
// contiguous float32.
int emulated_backward(View grad_out, View q, View k, View v, const float* lse,
                      const float* delta, View grad_q, View grad_k, View grad_v, int64_t B,
                      int64_t N, int64_t sq, int64_t sk, int64_t d, int64_t L, int64_t P,
                      int64_t q_offset, float scale, int dtype) {
  bool ok = false;
  with_dtype(dtype, [&](auto element) {
    using T = decltype(element);
    const nc::BackwardArgs<T> a{heads<const T>(grad_out, N), heads<const T>(q, N),
                                heads<const T>(k, N), heads<const T>(v, N), lse, delta,
                                heads<float>(grad_q, N), heads<T>(grad_k, N), heads<T>(grad_v, N),
                                {sq, sk, L, P, q_offset}, B * N, static_cast<int>(d), scale};
    const int64_t tiles = nbp_mega::ceil_div(sk, nc::kBwdBK);
    ok = nc::with_head_dim(d, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      const size_t bytes = nc::BackwardTiles<T, DP>(0).bytes;
      emulate_grid(B * N, tiles, nc::kThreads, bytes, [&](int64_t x, int64_t y, char* smem) {
        nc::backward_block<T, DP>(a, x, y, smem);
      });
    });
  });
  return ok ? 0 : 1;
}

// Dynamic shared memory a forward (backward = 0) or backward block takes on the GPU, where T
// is a 2-byte type, at compiled head dim dp; -1 if dp is not one.
int64_t shared_memory_bytes(int backward, int64_t dp) {
  int64_t bytes = -1;
  nc::with_head_dim(dp, [&](auto compiled) {
    constexpr int DP = decltype(compiled)::value;
    if (DP != dp) return;
    bytes = backward ? nc::BackwardTiles<uint16_t, DP>(0).bytes
                     : nc::ForwardTiles<uint16_t, DP>(0).bytes;
  });
  return bytes;
}

}  // extern "C"
