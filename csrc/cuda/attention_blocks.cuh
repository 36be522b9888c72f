// The thread-block programs of the CUDA block-causal attention (FlashAttention-2's algorithm):
// what one block does for one query tile (forward) or one key tile (backward). The __global__
// wrappers and launches are in attention_kernels.cu; the CPU emulation in tests/ops runs these
// same functions.
//
// Legend: h a head (h = b * N + n); Sq queries; Sk keys; d the head dim, DP the compiled head
// dim it is zero-padded to (32, 64, 96 or 128); BQ x BK a tile of the Sq x Sk score matrix;
// S = scale * Q K^T scores, P probabilities, dP = dO V^T, dS = P * (dP - delta).
//
// The tile schedule (which tiles to visit, which need masking) is tile_schedule.h's, shared
// with the CPU kernels and checked against the dense mask by tests/ops/test_tile_schedule.py.
//
// Backward, dq: a block owns one key tile, so it writes grad_k and grad_v once, but adds to
// the grad_q of every query tile it meets; those adds go to an fp32 buffer by atomicAdd. That
// is one pass over the scores; a second, query-major pass for dq would recompute P and dP.
#pragma once

#include <cmath>
#include <type_traits>

#include "../tile_schedule.h"
#include "launch.h"
#include "tile_ops.cuh"

namespace nbp_mega::cuda {

// Forward tiles: 64 query rows x 32 keys; backward: 32 x 32. Both fit the 99 KB of shared
// memory a block may have on every GPU from sm_80 on at DP = 128 (see the *Tiles below).
constexpr int kFwdBQ = 64, kFwdBK = 32;
constexpr int kBwdBQ = 32, kBwdBK = 32;

// Calls f(std::integral_constant<int, DP>{}) for the smallest compiled DP >= d; false if d is
// larger than them all.
template <class F>
bool with_head_dim(int64_t d, F&& f) {
  if (d <= 32) {
    f(std::integral_constant<int, 32>{});
  } else if (d <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (d <= 96) {
    f(std::integral_constant<int, 96>{});
  } else if (d <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    return false;
  }
  return true;
}

// Shared memory of a forward block. Row strides are padded (T tiles by 8 elements, fp32 by
// 4) against bank conflicts; they stay multiples of 8 (T) and 4 (fp32) as wmma requires.
// s is not padded (softmax_row avoids its conflicts otherwise): 1 KiB less lets an A100 SM
// (164 KiB, 1 KiB reserved per block) hold two blocks at DP = 128.
template <class T, int DP>
struct ForwardTiles {
  static constexpr int kLdT = DP + 8, kLdS = kFwdBK, kLdP = kFwdBK + 8, kLdO = DP + 4;
  T* q;          // [BQ, kLdT] the query tile
  T* k;          // [BK, kLdT] the key tile
  T* v;          // [BK, kLdT] the value tile
  float* s;      // [BQ, kLdS] raw scores q.k of the key tile
  T* p;          // [BQ, kLdP] exp(scale * s - m): the A operand of P V
  float* o;      // [BQ, kLdO] output accumulator, unnormalised
  float* m;      // [BQ] running max of scale * s
  float* l;      // [BQ] running sum of exp(scale * s - m)
  float* alpha;  // [BQ] this key tile's rescaling of o, l: exp(m_old - m_new)
  size_t bytes;  // 80.75 KiB at DP = 128 (fp16/bf16)

  __host__ __device__ explicit ForwardTiles(uintptr_t base) {
    SmemLayout smem(base);
    q = smem.take<T>(kFwdBQ * kLdT);
    k = smem.take<T>(kFwdBK * kLdT);
    v = smem.take<T>(kFwdBK * kLdT);
    s = smem.take<float>(kFwdBQ * kLdS);
    p = smem.take<T>(kFwdBQ * kLdP);
    o = smem.take<float>(kFwdBQ * kLdO);
    m = smem.take<float>(kFwdBQ);
    l = smem.take<float>(kFwdBQ);
    alpha = smem.take<float>(kFwdBQ);
    bytes = smem.bytes();
  }
};

// The online-softmax step of row r of a forward tile, whose first `visible` keys it sees:
// p = exp(scale * s - m_new) there (0 past it), and the row's m, l and alpha updated.
// Thread r walks its row from column r % BK on: the 32 threads of a warp then read 32
// different banks of s at every step (BK = 32 floats per row), not one bank 32 times.
template <class T, int DP>
__device__ __forceinline__ void softmax_row(const ForwardTiles<T, DP>& t, int r, int visible,
                                            float scale) {
  using Tiles = ForwardTiles<T, DP>;
  const float* s = t.s + r * Tiles::kLdS;
  T* p = t.p + r * Tiles::kLdP;
  static_assert(kFwdBK == 32 && Tiles::kLdS == 32, "the rotation assumes 32-float rows");
  if (visible == 0) {  // a row before this tile's blocks, or past Sq: nothing changes
    for (int c = 0; c < kFwdBK; ++c) p[c] = from_float<T>(0.f);
    t.alpha[r] = 1.f;
    return;
  }
  float row_max = -INFINITY;
  for (int j = 0; j < kFwdBK; ++j) {
    const int c = (j + r) % kFwdBK;
    if (c < visible) row_max = fmaxf(row_max, s[c]);
  }
  const float m_new = fmaxf(t.m[r], scale * row_max);  // scale > 0
  float sum = 0.f;
  for (int j = 0; j < kFwdBK; ++j) {
    const int c = (j + r) % kFwdBK;
    const float pc = c < visible ? expf(scale * s[c] - m_new) : 0.f;
    p[c] = from_float<T>(pc);
    sum += pc;
  }
  const float alpha = expf(t.m[r] - m_new);  // 0 on the first key tile (m = -inf)
  t.l[r] = t.l[r] * alpha + sum;
  t.m[r] = m_new;
  t.alpha[r] = alpha;
}

// Query tile qt of head h: out and lse of rows [q0, q0 + rows). Key tiles are visited in
// order from tile 0 (key 0, seen by every row: m is finite after it) to the last one any row
// of the tile sees; per-row masking only in tiles the schedule classifies as partial.
template <class T, int DP>
__device__ void forward_block(const ForwardArgs<T>& a, int64_t h, int64_t qt, char* smem) {
  using Tiles = ForwardTiles<T, DP>;
  constexpr int BQ = kFwdBQ, BK = kFwdBK;
  const Tiles t(reinterpret_cast<uintptr_t>(smem));
  const BlockCausalSchedule& sched = a.sched;
  const int64_t q0 = qt * BQ;
  const int rows = static_cast<int>(min64(BQ, sched.sq - q0));
  load_tile<BQ, DP>(a.q.row(h, q0), a.q.stride_s, rows, a.d, t.q, Tiles::kLdT);
  zero_tile<BQ, DP>(t.o, Tiles::kLdO);
  for (int r = threadIdx.x; r < BQ; r += kThreads) {
    t.m[r] = -INFINITY;
    t.l[r] = 0.f;
  }
  const int64_t n_tiles = sched.key_tiles(q0, q0 + rows, BK);
  for (int64_t kt = 0; kt < n_tiles; ++kt) {
    const int64_t k0 = kt * BK;
    const int width = static_cast<int>(min64(BK, sched.sk - k0));
    __syncthreads();  // the previous tile's P V is done with k, v, p (the first: q, o, m, l set)
    load_tile<BK, DP>(a.k.row(h, k0), a.k.stride_s, width, a.d, t.k, Tiles::kLdT);
    load_tile<BK, DP>(a.v.row(h, k0), a.v.stride_s, width, a.d, t.v, Tiles::kLdT);
    __syncthreads();
    // s = Q K^T: K [BK, DP] row-major is K^T [DP, BK] column-major.
    block_mma<BQ, BK, DP, wmma::row_major, wmma::col_major, false>(t.q, Tiles::kLdT, t.k,
                                                                   Tiles::kLdT, t.s, Tiles::kLdS);
    __syncthreads();
    const bool partial = sched.classify(q0, q0 + rows, k0, k0 + width) == kTilePartial;
    for (int r = threadIdx.x; r < BQ; r += kThreads) {
      const int visible = r >= rows  ? 0
                          : partial ? static_cast<int>(sched.visible_keys(q0 + r, k0, width))
                                    : width;
      softmax_row(t, r, visible, a.scale);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < BQ * DP; i += kThreads) {
      t.o[i / DP * Tiles::kLdO + i % DP] *= t.alpha[i / DP];
    }
    __syncthreads();
    block_mma<BQ, DP, BK, wmma::row_major, wmma::row_major, true>(t.p, Tiles::kLdP, t.v,
                                                                  Tiles::kLdT, t.o, Tiles::kLdO);
  }
  __syncthreads();
  T* out = a.out.row(h, q0);
  for (int i = threadIdx.x; i < BQ * DP; i += kThreads) {
    const int r = i / DP, c = i % DP;
    if (r < rows && c < a.d) {
      out[r * a.out.stride_s + c] = from_float<T>(t.o[r * Tiles::kLdO + c] / t.l[r]);
    }
  }
  for (int r = threadIdx.x; r < rows; r += kThreads) {
    a.lse[h * sched.sq + q0 + r] = t.m[r] + logf(t.l[r]);
  }
}

// Shared memory of a backward block (strides padded as in ForwardTiles).
template <class T, int DP>
struct BackwardTiles {
  static constexpr int kLdT = DP + 8, kLdS = kBwdBK + 4, kLdP = kBwdBK + 8, kLdA = DP + 4;
  T* k;          // [BK, kLdT] the key tile
  T* v;          // [BK, kLdT] the value tile
  float* dk;     // [BK, kLdA] accumulator of dS^T Q
  float* dv;     // [BK, kLdA] accumulator of P^T dO
  T* q;          // [BQ, kLdT] the query tile
  T* dout;       // [BQ, kLdT] its output gradient
  float* s;      // [BQ, kLdS] raw scores q.k
  float* dp;     // [BQ, kLdS] dO V^T
  T* p;          // [BQ, kLdP] probabilities
  T* ds;         // [BQ, kLdP] P * (dP - delta) (scale is applied to dk and dq in fp32)
  float* dq;     // [BQ, kLdA] this (query tile, key tile) pair's dS K, added to grad_q
  float* lse;    // [BQ]
  float* delta;  // [BQ]
  int* visible;  // [BQ] keys of the tile each row sees (0 for rows past Sq)
  size_t bytes;  // 98 KB at DP = 128 (fp16/bf16)

  __host__ __device__ explicit BackwardTiles(uintptr_t base) {
    SmemLayout smem(base);
    k = smem.take<T>(kBwdBK * kLdT);
    v = smem.take<T>(kBwdBK * kLdT);
    dk = smem.take<float>(kBwdBK * kLdA);
    dv = smem.take<float>(kBwdBK * kLdA);
    q = smem.take<T>(kBwdBQ * kLdT);
    dout = smem.take<T>(kBwdBQ * kLdT);
    s = smem.take<float>(kBwdBQ * kLdS);
    dp = smem.take<float>(kBwdBQ * kLdS);
    p = smem.take<T>(kBwdBQ * kLdP);
    ds = smem.take<T>(kBwdBQ * kLdP);
    dq = smem.take<float>(kBwdBQ * kLdA);
    lse = smem.take<float>(kBwdBQ);
    delta = smem.take<float>(kBwdBQ);
    visible = smem.take<int>(kBwdBQ);
    bytes = smem.bytes();
  }
};

// Loads query tile [q0, q0 + rows) with its lse, delta and per-row visible key counts.
template <class T, int DP>
__device__ __forceinline__ void load_query_tile(const BackwardArgs<T>& a,
                                                const BackwardTiles<T, DP>& t, int64_t h,
                                                int64_t q0, int rows, int64_t k0, int keys) {
  const BlockCausalSchedule& sched = a.sched;
  constexpr int kLdT = BackwardTiles<T, DP>::kLdT;
  load_tile<kBwdBQ, DP>(a.q.row(h, q0), a.q.stride_s, rows, a.d, t.q, kLdT);
  load_tile<kBwdBQ, DP>(a.grad_out.row(h, q0), a.grad_out.stride_s, rows, a.d, t.dout, kLdT);
  const bool partial = sched.classify(q0, q0 + rows, k0, k0 + keys) == kTilePartial;
  for (int r = threadIdx.x; r < kBwdBQ; r += kThreads) {
    const bool row = r < rows;
    t.lse[r] = row ? a.lse[h * sched.sq + q0 + r] : 0.f;
    t.delta[r] = row ? a.delta[h * sched.sq + q0 + r] : 0.f;
    t.visible[r] = !row     ? 0
                   : partial ? static_cast<int>(sched.visible_keys(q0 + r, k0, keys))
                             : keys;
  }
}

// P and dS of the loaded (query tile, key tile) pair from s and dp.
template <class T, int DP>
__device__ __forceinline__ void probabilities_and_dscores(const BackwardTiles<T, DP>& t,
                                                          float scale) {
  using Tiles = BackwardTiles<T, DP>;
  for (int i = threadIdx.x; i < kBwdBQ * kBwdBK; i += kThreads) {
    const int r = i / kBwdBK, c = i % kBwdBK;
    const float p = c < t.visible[r] ? expf(scale * t.s[r * Tiles::kLdS + c] - t.lse[r]) : 0.f;
    const float ds = p * (t.dp[r * Tiles::kLdS + c] - t.delta[r]);
    t.p[r * Tiles::kLdP + c] = from_float<T>(p);
    t.ds[r * Tiles::kLdP + c] = from_float<T>(ds);
  }
}

// Key tile kt of head h: grad_k and grad_v of keys [k0, k0 + keys) (kept in shared memory
// across the query tiles), and their share of grad_q (atomicAdd, see above). The
// query tiles visited start at the first that sees key k0; tiles entirely hidden come before.
template <class T, int DP>
__device__ void backward_block(const BackwardArgs<T>& a, int64_t h, int64_t kt, char* smem) {
  using Tiles = BackwardTiles<T, DP>;
  using wmma::col_major;
  using wmma::row_major;
  constexpr int BQ = kBwdBQ, BK = kBwdBK;
  const Tiles t(reinterpret_cast<uintptr_t>(smem));
  const BlockCausalSchedule& sched = a.sched;
  const int64_t k0 = kt * BK;
  const int keys = static_cast<int>(min64(BK, sched.sk - k0));
  load_tile<BK, DP>(a.k.row(h, k0), a.k.stride_s, keys, a.d, t.k, Tiles::kLdT);
  load_tile<BK, DP>(a.v.row(h, k0), a.v.stride_s, keys, a.d, t.v, Tiles::kLdT);
  zero_tile<BK, DP>(t.dk, Tiles::kLdA);
  zero_tile<BK, DP>(t.dv, Tiles::kLdA);
  const int64_t n_qt = ceil_div(sched.sq, BQ);
  for (int64_t qt = sched.first_query_tile(k0, BQ); qt < n_qt; ++qt) {
    const int64_t q0 = qt * BQ;
    const int rows = static_cast<int>(min64(BQ, sched.sq - q0));
    __syncthreads();  // the previous pair is done with q, dout, p, ds, dq (first: k, v set)
    load_query_tile(a, t, h, q0, rows, k0, keys);
    __syncthreads();
    block_mma<BQ, BK, DP, row_major, col_major, false>(t.q, Tiles::kLdT, t.k, Tiles::kLdT, t.s,
                                                       Tiles::kLdS);
    block_mma<BQ, BK, DP, row_major, col_major, false>(t.dout, Tiles::kLdT, t.v, Tiles::kLdT,
                                                       t.dp, Tiles::kLdS);
    __syncthreads();
    probabilities_and_dscores(t, a.scale);
    __syncthreads();
    // P [BQ, BK] row-major is P^T [BK, BQ] column-major; likewise dS.
    block_mma<BK, DP, BQ, col_major, row_major, true>(t.p, Tiles::kLdP, t.dout, Tiles::kLdT,
                                                      t.dv, Tiles::kLdA);
    block_mma<BK, DP, BQ, col_major, row_major, true>(t.ds, Tiles::kLdP, t.q, Tiles::kLdT,
                                                      t.dk, Tiles::kLdA);
    block_mma<BQ, DP, BK, row_major, row_major, false>(t.ds, Tiles::kLdP, t.k, Tiles::kLdT,
                                                       t.dq, Tiles::kLdA);
    __syncthreads();
    float* dq = a.grad_q.row(h, q0);
    for (int i = threadIdx.x; i < BQ * DP; i += kThreads) {
      const int r = i / DP, c = i % DP;
      if (r < rows && c < a.d) {
        atomicAdd(dq + r * a.grad_q.stride_s + c, a.scale * t.dq[r * Tiles::kLdA + c]);
      }
    }
  }
  __syncthreads();
  store_tile<BK, DP>(t.dk, Tiles::kLdA, a.scale, keys, a.d, a.grad_k.row(h, k0),
                     a.grad_k.stride_s);
  store_tile<BK, DP>(t.dv, Tiles::kLdA, 1.f, keys, a.d, a.grad_v.row(h, k0), a.grad_v.stride_s);
}

}  // namespace nbp_mega::cuda
