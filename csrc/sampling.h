// Declarations of nbp_mega::sample_rows, shared by the op registration (ops.cpp) and the CPU
// kernel (cpu/sampling_cpu.cpp).
//
// Legend: R rows (one position of one sample each); V vocabulary.
//   logits [R, V] float32; uniform [R] in [0, 1) -> ids [R] int64: row r's token is the
//   inverse CDF at uniform[r] of softmax(logits[r] / temperature) restricted to its top_k
//   tokens (0 = all), then to the top-p nucleus of those (renormalised).
#pragma once

#include <ATen/core/Tensor.h>

namespace nbp_mega {

// Raises c10::Error naming the offending argument when the inputs do not describe R rows to
// sample from.
void check_sample_inputs(const at::Tensor& logits, const at::Tensor& uniform, int64_t top_k,
                         double top_p, double temperature);

namespace cpu {
at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniform, int64_t top_k,
                       double top_p, double temperature);
}  // namespace cpu

}  // namespace nbp_mega
