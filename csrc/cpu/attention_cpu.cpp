// CPU forward and backward of block-causal attention: tiles of BQ query rows x BK keys,
// online softmax (FlashAttention-2's algorithm), tiles above the block diagonal never visited
// (tile_schedule.h), per-row masking only in tiles that straddle a block boundary.
//
// Legend: B batch; N heads; H = B * N (one "head" is one (batch, head) pair); Sq queries;
// Sk keys; D head dim; Dp = D rounded up to kPad; Sqp, Skp likewise; BQ x BK a tile;
// G groups of key tiles in the backward (each with its own dq partial sum).
//
// Work is split into tasks (forward: one query tile of one head; backward: every G-th key tile
// of one head) handed to torch's intra-op OpenMP threads one at a time. Operands read by rows
// (q, k, v, grad_out) are used in place when they are fp32 with D = Dp and each head's rows
// contiguous; otherwise ATen copies them into fp32, zero-padded buffers (bf16/fp16,
// D % 16 != 0, rows far apart). Operands
// a GEMM wants transposed (k in the forward; q, grad_out in the backward) are always copied
// once, transposed and padded: an O(S D) copy, small next to the O(S^2 D) products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../attention.h"
#include "tile_kernels.h"

namespace nbp_mega::cpu {
namespace {

constexpr int64_t BQ = 64;  // query rows per tile
constexpr int64_t BK = 64;  // keys per tile

// Row r of head h (h = b * N + n) of a [B, N, S, Dp] fp32 tensor with any strides over B, N
// and S: how the kernels read q, k, v and grad_out.
struct Rows {
  const float* data;
  int64_t heads_per_batch, batch_stride, head_stride, row_stride;

  const float* at(int64_t h, int64_t r) const {
    return data + h / heads_per_batch * batch_stride + h % heads_per_batch * head_stride +
           r * row_stride;
  }
};

// x [B, N, S, D] as Rows of dp floats: x itself when it is fp32 with D = dp and unit stride
// over D (and, if `dense`, each head's rows contiguous), else a zero-padded fp32 copy
// [B, N, S, dp]; `keep` holds the tensor the rows point into. GEMM operands want `dense`: the
// model's q, k, v are views of a [B, S, N, 3, D] projection, and tiles of 64 rows pages apart
// thrash L1 sets and the TLB, which measured slower than the copy.
Rows rows_of(const at::Tensor& x, int64_t dp, bool dense, at::Tensor& keep) {
  const int64_t d = x.size(3);
  const bool in_place = x.scalar_type() == at::kFloat && d == dp && x.stride(3) == 1 &&
                        (!dense || x.size(2) <= 1 || x.stride(2) == dp);
  if (in_place) {
    keep = x;
  } else {  // one copy (constant_pad_nd measured 4x slower than this on strided inputs)
    keep = at::empty({x.size(0), x.size(1), x.size(2), dp}, x.options().dtype(at::kFloat));
    keep.narrow(3, 0, d).copy_(x);
    if (dp > d) keep.narrow(3, d, dp - d).zero_();
  }
  return Rows{keep.const_data_ptr<float>(), std::max<int64_t>(keep.size(1), 1), keep.stride(0),
              keep.stride(1), keep.stride(2)};
}

// The S rows of every head of x, transposed: fp32 [B, N, dp, cols], zero past column S: the
// B operand of a product over the head dim. Blocks of 16 rows, so that each column of a block
// is one cache line written (ATen's transposing copy_ measured 2x slower than a plain copy,
// 6x from the model's strided q, k, v).
at::Tensor transposed(const Rows& x, int64_t B, int64_t N, int64_t s, int64_t dp, int64_t cols,
                      const at::TensorOptions& options) {
  constexpr int64_t kRows = 16;
  at::Tensor t = at::empty({B, N, dp, cols}, options.dtype(at::kFloat));
  float* out = t.data_ptr<float>();
  at::parallel_for(0, B * N, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      float* th = out + h * dp * cols;
      for (int64_t r0 = 0; r0 < s; r0 += kRows) {
        const int64_t n = std::min(kRows, s - r0);
        const float* src[kRows];
        for (int64_t i = 0; i < n; ++i) src[i] = x.at(h, r0 + i);
        for (int64_t c = 0; c < dp; ++c)
          for (int64_t i = 0; i < n; ++i) th[c * cols + r0 + i] = src[i][c];
      }
      for (int64_t c = 0; c < dp; ++c) std::fill(th + c * cols + s, th + (c + 1) * cols, 0.f);
    }
  });
  return t;
}

// Runs task(i, scratch) for every i in [0, n) on torch's intra-op threads. Each thread takes
// the next task from a shared counter: tasks differ in cost, static chunks would idle threads.
template <class F>
void parallel_tasks(int64_t n, int64_t scratch_floats, const F& task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(scratch_floats);
    for (int64_t i = next++; i < n; i = next++) task(i, scratch.data());
  });
}

struct Forward {
  BlockCausalSchedule sched;
  int64_t heads, dp, skp;
  float scale;
  Rows q;           // [H, Sq, Dp]
  const float* kt;  // [H, Dp, Skp]
  Rows v;           // [H, Sk, Dp]
  float* out;       // [H, Sq, Dp]
  float* lse;       // [H, Sq]

  int64_t scratch_floats() const { return BQ * BK + BQ * dp + 2 * BQ; }

  // One query tile [q0, q0 + rows) of head h.
  void tile(int64_t h, int64_t q0, float* scratch) const {
    const TileKernels& kern = tile_kernels();
    const int64_t sq = sched.sq, sk = sched.sk, rows = std::min(BQ, sq - q0);
    const float* qh = q.at(h, q0);
    const float* kth = kt + h * dp * skp;
    const float* vh = v.at(h, 0);
    const float scale2 = scale * kLog2e;  // the softmax runs in base 2 (tile_kernels.h)
    float* s = scratch;          // [BQ, BK] scores, then probabilities
    float* acc = s + BQ * BK;    // [BQ, Dp] unnormalised output
    float* m = acc + BQ * dp;    // [BQ] running max of scale2 * score
    float* l = m + BQ;           // [BQ] running sum of 2^(scale2 * score - m)
    std::fill(acc, acc + rows * dp, 0.f);
    std::fill(m, m + rows, -std::numeric_limits<float>::infinity());
    std::fill(l, l + rows, 0.f);
    const int64_t n_tiles = sched.key_tiles(q0, q0 + rows, BK);
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t k0 = t * BK, width = std::min(BK, sk - k0), widthp = round_up(width, kPad);
      kern.gemm(rows, widthp, dp, qh, q.row_stride, 1, kth + k0, skp, s, BK, false);  // Q K^T
      const bool partial = sched.classify(q0, q0 + rows, k0, k0 + width) == kTilePartial;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t visible = partial ? sched.visible_keys(q0 + r, k0, width) : width;
        const float alpha = kern.softmax_step(s + r * BK, visible, widthp, scale2, m + r, l + r);
        if (alpha != 1.f) kern.scale(acc + r * dp, dp, alpha);
      }
      // O += P V over the tile's `width` keys (V has no padding rows to read)
      kern.gemm(rows, dp, width, s, BK, 1, vh + k0 * v.row_stride, v.row_stride, acc, dp, true);
    }
    for (int64_t r = 0; r < rows; ++r) {
      kern.scale(acc + r * dp, dp, 1.f / l[r]);
      std::copy(acc + r * dp, acc + (r + 1) * dp, out + (h * sq + q0 + r) * dp);
      lse[h * sq + q0 + r] = m[r] * kLn2 + std::log(l[r]);
    }
  }

  void run() const {
    const int64_t n_qt = ceil_div(sched.sq, BQ);
    // Largest tasks first (the last query tiles see the most keys): a shorter tail.
    parallel_tasks(heads * n_qt, scratch_floats(), [&](int64_t i, float* scratch) {
      tile(i % heads, (n_qt - 1 - i / heads) * BQ, scratch);
    });
  }
};

struct Backward {
  BlockCausalSchedule sched;
  int64_t heads, dp, sqp, groups;
  float scale;
  Rows q;              // [H, Sq, Dp]
  const float* qt;     // [H, Dp, Sqp]
  Rows dout;           // [H, Sq, Dp]
  const float* doutt;  // [H, Dp, Sqp]
  Rows k;              // [H, Sk, Dp]
  Rows v;              // [H, Sk, Dp]
  const float* lse2;   // [H, Sqp] lse * log2(e)
  const float* delta;  // [H, Sqp]
  float* dq;           // [G, H, Sq, Dp] partial sums, scaled at the end
  float* dk;           // [H, Sk, Dp]
  float* dv;           // [H, Sk, Dp]

  // P^T and dS^T tiles, then the dk and dv accumulators of the current key tile.
  int64_t scratch_floats() const { return 2 * BK * BQ + 2 * BK * dp; }

  // The query tile at q0 against the key tile [k0, k0 + keys) of head h, in transposed form:
  // row c of a tile is key k0 + c, column r is query q0 + r.
  void tile(int64_t h, int64_t k0, int64_t keys, int64_t q0, float* dq_h, float* scratch) const {
    const TileKernels& kern = tile_kernels();
    const int64_t sq = sched.sq, rows = std::min(BQ, sq - q0), rowsp = round_up(rows, kPad);
    const float* kh = k.at(h, k0);
    const float* vh = v.at(h, k0);
    float* pt = scratch;                       // [BK, BQ] P^T
    float* dst = pt + BK * BQ;                 // [BK, BQ] dP^T, then dS^T
    float* dk_acc = dst + BK * BQ;             // [BK, Dp]
    float* dv_acc = dk_acc + BK * dp;          // [BK, Dp]
    kern.gemm(keys, rowsp, dp, kh, k.row_stride, 1, qt + h * dp * sqp + q0, sqp, pt, BQ, false);
    const bool partial = sched.classify(q0, q0 + rows, k0, k0 + keys) == kTilePartial;
    for (int64_t c = 0; c < keys; ++c) {
      const int64_t hidden = partial ? sched.hidden_rows(k0 + c, q0, rows) : 0;
      kern.probs(pt + c * BQ, lse2 + h * sqp + q0, hidden, rows, rowsp, scale * kLog2e);
    }
    kern.gemm(keys, rowsp, dp, vh, v.row_stride, 1, doutt + h * dp * sqp + q0, sqp, dst, BQ,
              false);
    for (int64_t c = 0; c < keys; ++c)
      kern.dscores(dst + c * BQ, pt + c * BQ, delta + h * sqp + q0, rowsp);
    kern.gemm(keys, dp, rows, pt, BQ, 1, dout.at(h, q0), dout.row_stride, dv_acc, dp, true);
    kern.gemm(keys, dp, rows, dst, BQ, 1, q.at(h, q0), q.row_stride, dk_acc, dp, true);
    // dQ += dS K, with dS read through the transposed tile (A's row stride 1, column BQ)
    kern.gemm(rows, dp, keys, dst, 1, BQ, kh, k.row_stride, dq_h + q0 * dp, dp, true);
  }

  // Key tiles g, g + G, g + 2G, ... of head h (interleaved: early key tiles are seen by more
  // queries and cost more); their dq contributions go to partial sum g.
  void task(int64_t h, int64_t g, float* scratch) const {
    const int64_t sq = sched.sq, sk = sched.sk;
    float* dq_h = dq + (g * heads + h) * sq * dp;
    float* dk_acc = scratch + 2 * BK * BQ;
    float* dv_acc = dk_acc + BK * dp;
    for (int64_t k0 = g * BK; k0 < sk; k0 += groups * BK) {
      const int64_t keys = std::min(BK, sk - k0);
      std::fill(dk_acc, dk_acc + 2 * BK * dp, 0.f);  // dk_acc and dv_acc
      for (int64_t q0 = sched.first_query_tile(k0, BQ) * BQ; q0 < sq; q0 += BQ)
        tile(h, k0, keys, q0, dq_h, scratch);
      tile_kernels().scale(dk_acc, keys * dp, scale);
      std::copy(dk_acc, dk_acc + keys * dp, dk + (h * sk + k0) * dp);
      std::copy(dv_acc, dv_acc + keys * dp, dv + (h * sk + k0) * dp);
    }
  }

  void run() const {
    parallel_tasks(heads * groups, scratch_floats(), [&](int64_t i, float* scratch) {
      task(i / groups, i % groups, scratch);
    });
  }
};

// Enough key-tile groups that every thread has about four tasks, when there are few heads.
int64_t backward_groups(int64_t heads, int64_t key_tiles) {
  const int64_t wanted = ceil_div(4 * at::get_num_threads(), std::max<int64_t>(heads, 1));
  return std::clamp<int64_t>(wanted, 1, std::max<int64_t>(key_tiles, 1));
}

// The first D columns of x [B, N, S, Dp] fp32 as a contiguous tensor of `dtype`.
at::Tensor unpad(const at::Tensor& x, int64_t d, at::ScalarType dtype) {
  return x.narrow(3, 0, d).to(dtype).contiguous();
}

}  // namespace

const char* isa() { return tile_kernels().isa; }

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k_all,
                                           const at::Tensor& v_all, int64_t block_len,
                                           int64_t prefix_len, int64_t q_offset, double scale) {
  check_attention_inputs("block_causal_attention (CPU)", q, k_all, v_all, block_len, prefix_len,
                         q_offset, scale);
  // Keys past the last query's block are seen by no query: left out before the transposing
  // copy, which would otherwise cost O(Sk D) per call for a few queries against a KV cache.
  const int64_t seen = q.size(2) == 0 ? 0
      : make_schedule(q, k_all, block_len, prefix_len, q_offset).key_end(q.size(2) - 1);
  const at::Tensor k = k_all.narrow(2, 0, seen), v = v_all.narrow(2, 0, seen);
  const int64_t B = q.size(0), N = q.size(1), sq = q.size(2), sk = k.size(2), d = q.size(3);
  const int64_t dp = round_up(d, kPad), skp = round_up(sk, kPad);
  at::Tensor q_keep, k_keep, v_keep;
  const Rows q_rows = rows_of(q, dp, true, q_keep), v_rows = rows_of(v, dp, true, v_keep);
  const at::Tensor ktf = transposed(rows_of(k, dp, false, k_keep), B, N, sk, dp, skp, q.options());
  at::Tensor out = at::empty({B, N, sq, dp}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, N, sq}, q.options().dtype(at::kFloat));
  if (out.numel() > 0) {
    const Forward fwd{make_schedule(q, k, block_len, prefix_len, q_offset), B * N, dp, skp,
                      static_cast<float>(scale), q_rows, ktf.data_ptr<float>(), v_rows,
                      out.data_ptr<float>(), lse.data_ptr<float>()};
    fwd.run();
  }
  return {unpad(out, d, q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& grad_lse,
    int64_t block_len, int64_t prefix_len, int64_t q_offset, double scale) {
  check_backward_inputs("block_causal_attention_backward (CPU)", grad_out, q, k, v, out, lse,
                        grad_lse, block_len, prefix_len, q_offset, scale);
  const int64_t B = q.size(0), N = q.size(1), sq = q.size(2), sk = k.size(2), d = q.size(3);
  const int64_t dp = round_up(d, kPad), sqp = round_up(sq, kPad);
  const int64_t groups = backward_groups(B * N, ceil_div(sk, BK));
  at::Tensor q_keep, do_keep, k_keep, v_keep;
  const Rows q_rows = rows_of(q, dp, true, q_keep), do_rows = rows_of(grad_out, dp, true, do_keep);
  const Rows k_rows = rows_of(k, dp, true, k_keep), v_rows = rows_of(v, dp, true, v_keep);
  const at::Tensor qtf = transposed(q_rows, B, N, sq, dp, sqp, q.options());
  const at::Tensor dotf = transposed(do_rows, B, N, sq, dp, sqp, q.options());
  const at::Tensor lse2 = at::constant_pad_nd(lse.to(at::kFloat) * kLog2e, {0, sqp - sq});
  const at::Tensor delta =
      at::constant_pad_nd(softmax_backward_delta(grad_out, out, grad_lse), {0, sqp - sq})
          .contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros({groups, B, N, sq, dp}, f32);
  at::Tensor dk = at::empty({B, N, sk, dp}, f32), dv = at::empty({B, N, sk, dp}, f32);
  if (dk.numel() > 0) {
    const Backward bwd{make_schedule(q, k, block_len, prefix_len, q_offset), B * N, dp, sqp,
                       groups,
                       static_cast<float>(scale), q_rows, qtf.data_ptr<float>(), do_rows,
                       dotf.data_ptr<float>(), k_rows, v_rows, lse2.data_ptr<float>(),
                       delta.data_ptr<float>(),
                       dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>()};
    bwd.run();
  }
  const at::Tensor dq_sum = groups == 1 ? dq[0] : dq.sum(0);
  return {unpad(dq_sum.mul_(scale), d, q.scalar_type()), unpad(dk, d, k.scalar_type()),
          unpad(dv, d, v.scalar_type())};
}

}  // namespace nbp_mega::cpu
