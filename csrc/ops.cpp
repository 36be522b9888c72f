// The nbp_mega operator library: schemas, the CPU registrations, input checks shared by all
// backends, the tile-schedule probe used by the tests, and the Python module nbp_mega._C
// (which only carries build facts; the ops live in torch.ops.nbp_mega).
//
// Legend: B batch; N heads; Sq queries; Sk keys; D head dim; L block length; P prefix length;
// BQ x BK a tile (probe arguments block_q, block_k); nQ = ceil(Sq / BQ), nK = ceil(Sk / BK).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "attention.h"
#include "sampling.h"

#ifndef NBP_CUDA_ARCHS
#define NBP_CUDA_ARCHS ""
#endif

namespace nbp_mega {

void check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, int64_t block_len, int64_t prefix_len,
                            int64_t q_offset, double scale) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
                    ": q, k, v must be [B, N, S, D]; got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
                        q.size(1) == k.size(1) && q.size(3) == k.size(3),
                    op, ": q ", q.sizes(), " and k/v ", k.sizes(), "/", v.sizes(),
                    " must agree in B, N and D (k and v in everything)");
  TORCH_CHECK_VALUE(q.size(3) >= 1, op, ": head dim D must be >= 1, got ", q.size(3));
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   op, ": q, k, v must share a dtype; got ", q.scalar_type(), ", ",
                   k.scalar_type(), ", ", v.scalar_type());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
                   ": dtype must be float32, float16 or bfloat16; got ", dtype);
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device(), op,
                    ": q, k, v must be on one device; got ", q.device(), ", ", k.device(),
                    ", ", v.device());
  TORCH_CHECK_VALUE(block_len >= 1 && prefix_len >= 0 && q_offset >= 0, op,
                    ": need block_len >= 1, prefix_len >= 0, q_offset >= 0; got ", block_len,
                    ", ", prefix_len, ", ", q_offset);
  TORCH_CHECK_VALUE(q_offset + q.size(2) <= k.size(2), op, ": queries end at position ",
                    q_offset + q.size(2), " = q_offset + Sq, beyond the ", k.size(2), " keys");
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), op,
                    ": scale must be positive and finite, got ", scale);
}

void check_backward_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& q,
                           const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
                           int64_t block_len, int64_t prefix_len, int64_t q_offset,
                           double scale) {
  check_attention_inputs(op, q, k, v, block_len, prefix_len, q_offset, scale);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": grad_out ", grad_out.sizes(), " and out ", out.sizes(),
                    " must have the shape of q ", q.sizes());
  const auto rows = q.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(lse.sizes() == rows, op, ": lse must be [B, N, Sq] = ", rows, ", got ",
                    lse.sizes());
  TORCH_CHECK_VALUE(!grad_lse.has_value() || grad_lse->sizes() == rows, op,
                    ": grad_lse must be [B, N, Sq] = ", rows);
}

at::Tensor softmax_backward_delta(const at::Tensor& grad_out, const at::Tensor& out,
                                  const std::optional<at::Tensor>& grad_lse) {
  at::Tensor delta = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
  if (grad_lse.has_value()) delta = delta - grad_lse->to(at::kFloat);
  return delta;
}

void check_sample_inputs(const at::Tensor& logits, const at::Tensor& uniform, int64_t top_k,
                         double top_p, double temperature) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1,
                    "sample_rows: logits must be [R, V] with V >= 1; got ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, "sample_rows: logits must be float32; got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.size(1) <= INT32_MAX, "sample_rows: a vocabulary of ", logits.size(1),
                    " ids; at most 2^31 - 1");
  TORCH_CHECK_VALUE(uniform.dim() == 1 && uniform.size(0) == logits.size(0),
                    "sample_rows: uniform must be [R] = [", logits.size(0), "]; got ",
                    uniform.sizes());
  TORCH_CHECK_VALUE(uniform.device() == logits.device(), "sample_rows: uniform on ",
                    uniform.device(), ", logits on ", logits.device());
  TORCH_CHECK_VALUE(top_k >= 0, "sample_rows: top_k must be >= 0 (0 = all); got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "sample_rows: need 0 < top_p <= 1; got ", top_p);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(1.4426950408889634 / temperature),
                    "sample_rows: temperature must be positive (0 = greedy is argmax, not "
                    "sampled) and not so small that log2(e) / temperature overflows; got ",
                    temperature);
}

namespace {

// The schedule as the kernels walk it, for tiles of block_q x block_k:
//   tiles [3, nQ, nK] int8: TileClass of every tile; 1 where the forward loop visits it;
//                           1 where the backward loop visits it;
//   key_end [Sq] int64, first_query [Sk] int64: the per-row and per-key bounds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_schedule(int64_t sq, int64_t sk,
                                                             int64_t block_len,
                                                             int64_t prefix_len,
                                                             int64_t q_offset, int64_t block_q,
                                                             int64_t block_k) {
  TORCH_CHECK_VALUE(sq >= 1 && sk >= q_offset + sq && block_len >= 1 && prefix_len >= 0 &&
                        q_offset >= 0 && block_q >= 1 && block_k >= 1,
                    "tile_schedule: invalid arguments");
  const BlockCausalSchedule s{sq, sk, block_len, prefix_len, q_offset};
  const int64_t nq = ceil_div(sq, block_q), nk = ceil_div(sk, block_k);
  at::Tensor tiles = at::zeros({3, nq, nk}, at::kChar);
  auto t = tiles.accessor<int8_t, 3>();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t q0 = i * block_q, q1 = std::min(sq, q0 + block_q);
    for (int64_t j = 0; j < nk; ++j)
      t[0][i][j] = s.classify(q0, q1, j * block_k, (j + 1) * block_k);
    for (int64_t j = 0; j < s.key_tiles(q0, q1, block_k); ++j) t[1][i][j] = 1;
  }
  for (int64_t j = 0; j < nk; ++j)
    for (int64_t i = s.first_query_tile(j * block_k, block_q); i < nq; ++i) t[2][i][j] = 1;
  at::Tensor key_end = at::empty({sq}, at::kLong), first_query = at::empty({sk}, at::kLong);
  auto ends = key_end.accessor<int64_t, 1>();
  auto firsts = first_query.accessor<int64_t, 1>();
  for (int64_t r = 0; r < sq; ++r) ends[r] = s.key_end(r);
  for (int64_t j = 0; j < sk; ++j) firsts[j] = s.first_query(j);
  return {tiles, key_end, first_query};
}

}  // namespace
}  // namespace nbp_mega

TORCH_LIBRARY(nbp_mega, m) {
  m.def(
      "block_causal_attention(Tensor q, Tensor k, Tensor v, int block_len, int prefix_len, "
      "int q_offset, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "block_causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, Tensor? grad_lse, int block_len, int prefix_len, int q_offset, "
      "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  m.def(
      "tile_schedule(int sq, int sk, int block_len, int prefix_len, int q_offset, int block_q, "
      "int block_k) -> (Tensor tiles, Tensor key_end, Tensor first_query)",
      &nbp_mega::tile_schedule);
  m.def("sample_rows(Tensor logits, Tensor uniform, int top_k, float top_p, float temperature) "
        "-> Tensor");
}

// The forward's derivative (and both fake implementations) are registered from Python:
// nbp_mega/ops/fused.py. The backward is not differentiable: falling through the autograd
// key makes its outputs plain tensors, so a double backward fails loudly ("does not require
// grad") instead of silently dropping terms.
TORCH_LIBRARY_IMPL(nbp_mega, Autograd, m) {
  m.impl("block_causal_attention_backward", torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(nbp_mega, CPU, m) {
  m.impl("block_causal_attention", &nbp_mega::cpu::forward);
  m.impl("block_causal_attention_backward", &nbp_mega::cpu::backward);
  m.impl("sample_rows", &nbp_mega::cpu::sample_rows);
}

// nbp_mega._C: importing it loads the library (registering the ops); its attributes say what
// was compiled. The name must match the extension name in setup.py.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "nbp_mega kernels (build facts)",
                               -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef NBP_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(m, "with_cuda", with_cuda) < 0 ||
      PyModule_AddStringConstant(m, "cuda_archs", NBP_CUDA_ARCHS) < 0 ||
      PyModule_AddStringConstant(m, "cpu_isa", nbp_mega::cpu::isa()) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
