// The interface between the torch-facing host code (attention_cuda.cpp, compiled by the C++
// compiler) and the CUDA kernels (attention_kernels.cu, compiled by nvcc without the ATen
// headers, which would triple its compile time): kernel arguments as plain structs, and
// the launchers.
//
// Legend: B batch; N heads; h = b * N + n a head; Sq queries; Sk keys; d head dim.
// T is the element type: __half or __nv_bfloat16 (float in the CPU emulation of tests/ops).
#pragma once

#include <cstdint>

#include "../tile_schedule.h"

namespace nbp_mega::cuda {

// A [B, N, S, d] tensor in global memory with unit stride over d (other strides arbitrary).
template <class T>
struct HeadTensor {
  T* data;
  int64_t stride_b, stride_n, stride_s;
  int64_t heads;  // N

  // Row s of head h.
  NBP_HOST_DEVICE T* row(int64_t h, int64_t s) const {
    return data + h / heads * stride_b + h % heads * stride_n + s * stride_s;
  }
};

template <class T>
struct ForwardArgs {
  HeadTensor<const T> q, k, v;  // [B, N, Sq | Sk, d]
  HeadTensor<T> out;            // [B, N, Sq, d]
  float* lse;                   // [B * N, Sq], contiguous
  BlockCausalSchedule sched;
  int64_t heads;  // B * N
  int d;          // <= 128
  float scale;
};

template <class T>
struct BackwardArgs {
  HeadTensor<const T> grad_out, q;  // [B, N, Sq, d]
  HeadTensor<const T> k, v;         // [B, N, Sk, d]
  const float* lse;                 // [B * N, Sq], contiguous
  const float* delta;               // [B * N, Sq], contiguous: rowsum(dO * O) - grad_lse
  HeadTensor<float> grad_q;         // [B, N, Sq, d] fp32, zeroed; blocks atomicAdd into it
  HeadTensor<T> grad_k, grad_v;     // [B, N, Sk, d]
  BlockCausalSchedule sched;
  int64_t heads;  // B * N
  int d;          // <= 128
  float scale;
};

// Launch on the current CUDA stream of the current device (the caller sets it with a device
// guard); raise c10::Error for a grid or shared-memory need the GPU cannot meet. Defined,
// for T = __half and __nv_bfloat16, in attention_kernels.cu.
template <class T>
void launch_forward(const ForwardArgs<T>& args);
template <class T>
void launch_backward(const BackwardArgs<T>& args);

}  // namespace nbp_mega::cuda
