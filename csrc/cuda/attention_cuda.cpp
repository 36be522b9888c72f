// CUDA forward and backward of nbp_mega::block_causal_attention (float16/bfloat16, head dim
// <= 128) as torch ops: checks, allocation, the device guard, and the registration for the
// CUDA dispatch key. The kernels are in attention_kernels.cu (through launch.h).
//
// Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length.
//
// Inputs are read in place through their strides when D is their unit-stride dim (views of a
// fused QKV projection included) and copied with .contiguous() otherwise. Outputs are
// contiguous; grad_q is accumulated in fp32 (attention_blocks.cuh says why) and cast at the
// end.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would need the cuBLAS/cuSPARSE headers, which
// a minimal CUDA toolkit (nvcc + cudart, like /usr/local/cuda here) does not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "../attention.h"
#include "launch.h"

namespace nbp_mega::cuda {
namespace {

// x [B, N, S, D] as the kernels read it: unit stride over D.
at::Tensor unit_stride_d(const at::Tensor& x) { return x.stride(3) == 1 ? x : x.contiguous(); }

template <class T>
HeadTensor<T> heads_of(const at::Tensor& x) {
  return {static_cast<T*>(x.data_ptr()), x.stride(0), x.stride(1), x.stride(2), x.size(1)};
}

// Calls f(T{}) with T the CUDA type of a float16 or bfloat16 tensor.
template <class F>
void with_dtype(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf) {
    f(__half{});
  } else {
    f(__nv_bfloat16{});
  }
}

// What the CPU kernel takes and this one does not: float32, head dims above 128.
void check_supported(const char* op, const at::Tensor& q) {
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q, k, v must be CUDA tensors, got ", q.device());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernel takes float16 or bfloat16, got ", q.scalar_type(),
                   " (nbp_mega.ops.block_causal_attention routes other dtypes elsewhere)");
  TORCH_CHECK_VALUE(q.size(3) <= 128, op, ": the CUDA kernel takes head dim D <= 128, got ",
                    q.size(3), " (nbp_mega.ops.block_causal_attention routes it elsewhere)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, int64_t block_len,
                                           int64_t prefix_len, int64_t q_offset, double scale) {
  const char* op = "block_causal_attention (CUDA)";
  check_attention_inputs(op, q, k, v, block_len, prefix_len, q_offset, scale);
  check_supported(op, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), sq = q.size(2), d = q.size(3);
  at::Tensor out = at::empty({B, N, sq, d}, q.options());
  at::Tensor lse = at::empty({B, N, sq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const at::Tensor qs = unit_stride_d(q), ks = unit_stride_d(k), vs = unit_stride_d(v);
  with_dtype(q.scalar_type(), [&](auto dtype) {
    using T = decltype(dtype);
    launch_forward(ForwardArgs<T>{heads_of<const T>(qs), heads_of<const T>(ks),
                                  heads_of<const T>(vs), heads_of<T>(out), lse.data_ptr<float>(),
                                  make_schedule(q, k, block_len, prefix_len, q_offset), B * N,
                                  static_cast<int>(d), static_cast<float>(scale)});
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    int64_t block_len, int64_t prefix_len, int64_t q_offset, double scale) {
  const char* op = "block_causal_attention_backward (CUDA)";
  check_backward_inputs(op, grad_out, q, k, v, out, lse, grad_lse, block_len, prefix_len,
                        q_offset, scale);
  check_supported(op, q);
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type(), op, ": grad_out must be ",
                   q.scalar_type(), " like q, got ", grad_out.scalar_type());
  for (const at::Tensor* t : {&grad_out, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": grad_out, out and lse must be on ",
                      q.device(), " with q, got ", t->device());
  }
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = q.size(1), sq = q.size(2), sk = k.size(2), d = q.size(3);
  at::Tensor grad_q = at::zeros({B, N, sq, d}, q.options().dtype(at::kFloat));
  at::Tensor grad_k = at::empty({B, N, sk, d}, k.options());
  at::Tensor grad_v = at::empty({B, N, sk, d}, v.options());
  if (grad_k.numel() > 0) {
    const at::Tensor lse_f = lse.to(at::kFloat).contiguous();
    const at::Tensor delta = softmax_backward_delta(grad_out, out, grad_lse).contiguous();
    const at::Tensor dos = unit_stride_d(grad_out), qs = unit_stride_d(q);
    const at::Tensor ks = unit_stride_d(k), vs = unit_stride_d(v);
    with_dtype(q.scalar_type(), [&](auto dtype) {
      using T = decltype(dtype);
      launch_backward(BackwardArgs<T>{
          heads_of<const T>(dos), heads_of<const T>(qs), heads_of<const T>(ks),
          heads_of<const T>(vs), lse_f.data_ptr<float>(), delta.data_ptr<float>(),
          heads_of<float>(grad_q), heads_of<T>(grad_k), heads_of<T>(grad_v),
          make_schedule(q, k, block_len, prefix_len, q_offset), B * N, static_cast<int>(d),
          static_cast<float>(scale)});
    });
  }
  return {grad_q.to(q.scalar_type()), grad_k, grad_v};
}

}  // namespace nbp_mega::cuda

TORCH_LIBRARY_IMPL(nbp_mega, CUDA, m) {
  m.impl("block_causal_attention", &nbp_mega::cuda::forward);
  m.impl("block_causal_attention_backward", &nbp_mega::cuda::backward);
}
