// Declarations shared by the op registration (ops.cpp), the CPU kernels (cpu/) and the CUDA
// kernels (cuda/) of nbp_mega::block_causal_attention.
//
// Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length (block_len);
// P prefix length (prefix_len); q [B, N, Sq, D]; k, v [B, N, Sk, D]; out [B, N, Sq, D];
// lse [B, N, Sq] fp32, the natural-log sum of exp(scale * q.k) over the visible keys.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "tile_schedule.h"

namespace nbp_mega {

// Raises c10::Error naming `op` and the offending argument when q, k, v and the block
// arguments do not describe a valid block-causal attention problem.
void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, int64_t block_len, int64_t prefix_len,
                            int64_t q_offset, double scale);

// Also checks grad_out, out, lse (and grad_lse if given) against q, k, v.
void check_backward_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                           int64_t block_len, int64_t prefix_len, int64_t q_offset,
                           double scale);

inline BlockCausalSchedule make_schedule(const at::Tensor& q, const at::Tensor& k,
                                         int64_t block_len, int64_t prefix_len,
                                         int64_t q_offset) {
  return BlockCausalSchedule{q.size(2), k.size(2), block_len, prefix_len, q_offset};
}

// delta [B, N, Sq] fp32 = rowsum(grad_out * out) - grad_lse: the term every backward shares
// (dS = P * (dP - delta); the grad_lse part is the gradient through a returned lse).
at::Tensor softmax_backward_delta(const at::Tensor& grad_out, const at::Tensor& out,
                                  const std::optional<at::Tensor>& grad_lse);

namespace cpu {
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, int64_t block_len,
                                           int64_t prefix_len, int64_t q_offset, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    int64_t block_len, int64_t prefix_len, int64_t q_offset, double scale);
const char* isa();  // the instruction set of the tile loops this CPU runs: "avx2" | "generic"
}  // namespace cpu

#ifdef NBP_WITH_CUDA
// float16/bfloat16, D <= 128 (cuda/attention_cuda.cu, which also registers them).
namespace cuda {
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, int64_t block_len,
                                           int64_t prefix_len, int64_t q_offset, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    int64_t block_len, int64_t prefix_len, int64_t q_offset, double scale);
}  // namespace cuda
#endif

}  // namespace nbp_mega
