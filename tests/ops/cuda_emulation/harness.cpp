// The CUDA kernels' thread-block programs (csrc/cuda/attention_blocks.cuh) on the CPU, in
// fp32, as a C library for tests/ops/test_cuda_emulated.py (ctypes). Launches mirror
// csrc/cuda/attention_kernels.cu: the same grids, block order and shared-memory sizes.
//
// Legend: B batch; N heads; H = B * N; Sq queries; Sk keys; d head dim; L block length;
// P prefix length. A View is a [B, N, S, d] float tensor with unit stride over d.
#include "emulation.h"

#include "cuda/attention_blocks.cuh"

namespace nc = nbp_mega::cuda;

extern "C" {

struct View {
  float* data;
  int64_t stride_b, stride_n, stride_s;
};

static nc::HeadTensor<const float> in(View x, int64_t heads) {
  return {x.data, x.stride_b, x.stride_n, x.stride_s, heads};
}

static nc::HeadTensor<float> out(View x, int64_t heads) {
  return {x.data, x.stride_b, x.stride_n, x.stride_s, heads};
}

// Returns 0, or 1 if d is larger than the kernels take.
int emulated_forward(View q, View k, View v, View o, float* lse, int64_t B, int64_t N,
                     int64_t sq, int64_t sk, int64_t d, int64_t L, int64_t P, int64_t q_offset,
                     float scale) {
  const nc::ForwardArgs<float> a{in(q, N), in(k, N), in(v, N), out(o, N), lse,
                                 {sq, sk, L, P, q_offset}, B * N, static_cast<int>(d), scale};
  const int64_t tiles = nbp_mega::ceil_div(sq, nc::kFwdBQ);
  const bool ok = nc::with_head_dim(d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const size_t bytes = nc::ForwardTiles<float, DP>(0).bytes;
    emulate_grid(B * N, tiles, nc::kThreads, bytes, [&](int64_t x, int64_t y, char* smem) {
      nc::forward_block<float, DP>(a, x, tiles - 1 - y, smem);
    });
  });
  return ok ? 0 : 1;
}

// grad_q must be zeroed (the kernel adds into it); lse and delta are [H, Sq] contiguous.
int emulated_backward(View grad_out, View q, View k, View v, const float* lse,
                      const float* delta, View grad_q, View grad_k, View grad_v, int64_t B,
                      int64_t N, int64_t sq, int64_t sk, int64_t d, int64_t L, int64_t P,
                      int64_t q_offset, float scale) {
  const nc::BackwardArgs<float> a{in(grad_out, N), in(q, N), in(k, N), in(v, N), lse, delta,
                                  out(grad_q, N), out(grad_k, N), out(grad_v, N),
                                  {sq, sk, L, P, q_offset}, B * N, static_cast<int>(d),
                                  scale};
  const int64_t tiles = nbp_mega::ceil_div(sk, nc::kBwdBK);
  const bool ok = nc::with_head_dim(d, [&](auto dp) {
    constexpr int DP = decltype(dp)::value;
    const size_t bytes = nc::BackwardTiles<float, DP>(0).bytes;
    emulate_grid(B * N, tiles, nc::kThreads, bytes, [&](int64_t x, int64_t y, char* smem) {
      nc::backward_block<float, DP>(a, x, y, smem);
    });
  });
  return ok ? 0 : 1;
}

}  // extern "C"
