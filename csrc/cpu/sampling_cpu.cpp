// CPU sampler: one token per row of logits, by the inverse CDF of the distribution that
// nbp_mega.generate.sampling.filter_logits specifies (temperature, the top-k tokens, then
// top-p over the renormalised survivors), in O(V) per row and without sorting.
//
// Legend: R rows (batch x positions); V vocabulary; k top-k; n survivors of top-k (k, or V
// without top-k); key = a float's bits mapped to an unsigned integer of the same order.
//
// Per row, on one thread (rows are split over torch's intra-op threads):
//   1. top-k: a floor below the k-th largest key guessed from every 32nd token, one
//      vectorised pass keeping the keys at or above it (candidates, ~1.1 k; all V if the
//      guess was too high), a radix select of the k-th key among them (11 + 11 + 10 bits),
//      and the survivors in vocabulary order: the candidates above the k-th key and, of
//      those equal to it, the lowest-numbered ones until there are k;
//   2. weights 2^((x - max) log2(e) / T) (the table's exp2_sum, vectorised);
//   3. top-p: a histogram of the weights' mass over 256 bins per octave finds the bin where
//      the nucleus ends; only that bin's weights are sorted to find the exact cut (a token is
//      kept while the weight of the heavier tokens before it stays below top_p * total);
//   4. the inverse CDF at u over the kept tokens in vocabulary order, summed in double: the
//      masses of chunks of 256 tokens find the chunk, which alone is walked token by token.
// Every compaction (candidates, radix levels, survivors, the nucleus bin) is one pass of the
// ISA table's keys_at_least / keys_between (AVX-512: compress in registers). Measured at
// V = 64000, top-k 16000, top-p 0.9, one thread: 87 us a row, 186 before the chunked CDF, the
// vectorised compactions and the radix-selected floor (README, Generation speed).
// Ties: of several tokens tied at the top-p cut all are kept (as sampling.py's torch path);
// the top-k tie-break (lowest ids) may differ from torch.topk's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "../sampling.h"
#include "tile_kernels.h"

namespace nbp_mega::cpu {
namespace {

#include "order_keys.h"  // the keys keys_at_least computes, here for the scalar passes

inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return order_key_bits(u);
}

inline float bits_to_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

// The float whose order key is `key`.
inline float from_order_key(uint32_t key) {
  return bits_to_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// The bin, counted from the top, where `want` is reached by counts[] summed downwards;
// `want` becomes the count still wanted inside that bin.
int64_t bin_reaching(const uint32_t* counts, int64_t bins, int64_t& want) {
  for (int64_t b = bins - 1; b > 0; --b) {
    if (want <= static_cast<int64_t>(counts[b])) return b;
    want -= counts[b];
  }
  return 0;
}

struct Scratch {
  std::vector<uint32_t> hist, keys, narrowed, sampled;
  std::vector<float> w;
  std::vector<uint32_t> members;  // weights' bits
  std::vector<int32_t> ids, cand_ids;
  std::vector<float> mass;
  std::vector<double> chunk_mass;
};

// v's buffer with room for n elements, + kPad (the vectorised compactions store whole
// vectors). Only ever grows: a shrink and regrow would zero the regrown part on every row.
template <class T>
T* room(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n + kPad) v.resize(n + kPad);
  return v.data();
}

// Keys of +inf and -inf: a key above the first or below the second is a NaN.
constexpr uint32_t kInfKey = 0xFF800000u, kMinusInfKey = 0x007FFFFFu;
constexpr int64_t kTopBins = 2048;  // the first radix level: a key's top 11 bits

// Refuses a row holding NaN, or whose largest logit (key hi) is +inf or -inf.
void check_row(bool nan, uint32_t hi, int64_t row) {
  TORCH_CHECK_VALUE(!nan, "sample_rows: row ", row, " of the logits holds NaN");
  TORCH_CHECK_VALUE(hi != kInfKey && hi > kMinusInfKey, "sample_rows: row ", row,
                    " has no finite largest logit (+inf or all -inf)");
}

// The k-th largest of keys[0, n) (k <= n): a radix select over 11 + 11 + 10 bits, the first
// level over all n, the next ones over the keys of the chosen bin only (compacted by the
// table's keys_between).
struct KthKey {
  uint32_t key;
  int64_t ties;   // how many of the keys equal to it are among the top k
  int64_t equal;  // how many keys equal it
};

// The bits [shift, shift + bits) all 0 / all 1 below `prefix`: the keys with that prefix.
inline uint32_t prefix_lo(uint32_t prefix, int shift) { return prefix << shift; }
inline uint32_t prefix_hi(uint32_t prefix, int shift) {
  return (prefix << shift) | ((1u << shift) - 1);
}

KthKey kth_largest(const uint32_t* keys, int64_t n, int64_t k, Scratch& s) {
  const TileKernels& kern = tile_kernels();
  // two interleaved histograms: consecutive keys of one bin do not wait on each other's
  // increment (store-to-load forwarding)
  s.hist.assign(2 * kTopBins, 0);
  uint32_t* h0 = s.hist.data();
  uint32_t* h1 = h0 + kTopBins;
  int64_t i = 0;
  for (; i + 2 <= n; i += 2) {
    ++h0[keys[i] >> 21];
    ++h1[keys[i + 1] >> 21];
  }
  if (i < n) ++h0[keys[i] >> 21];
  for (int64_t b = 0; b < kTopBins; ++b) h0[b] += h1[b];
  int64_t want = k;
  uint32_t prefix = bin_reaching(h0, kTopBins, want);
  uint32_t* left = room(s.narrowed, n);
  int64_t m = kern.keys_between(keys, nullptr, n, prefix_lo(prefix, 21), prefix_hi(prefix, 21),
                                left, nullptr);
  int64_t equal = 0;
  for (const int bits : {11, 10}) {  // the remaining 21 bits
    const int shift = bits == 11 ? 10 : 0;
    const uint32_t mask = (1u << bits) - 1;
    s.hist.assign(size_t{1} << bits, 0);
    for (int64_t j = 0; j < m; ++j) ++s.hist[(left[j] >> shift) & mask];
    const int64_t bin = bin_reaching(s.hist.data(), int64_t{1} << bits, want);
    prefix = (prefix << bits) | static_cast<uint32_t>(bin);
    equal = s.hist[bin];
    if (shift)
      m = kern.keys_between(left, nullptr, m, prefix_lo(prefix, shift),
                            prefix_hi(prefix, shift), left, nullptr);
  }
  return {prefix, want, equal};
}

// A key at or below the k-th largest of x[0, V), most likely: from every 32nd token, the key
// ranked 4 standard deviations (+ 8) below where the k-th would rank among them; 0 (every key)
// for a short row. A guess only: select_top_k checks it and falls back to 0.
uint32_t sampled_floor(const float* x, int64_t V, int64_t k, Scratch& s) {
  constexpr int64_t kStride = 32;
  const int64_t m = V / kStride;
  if (m < 128) return 0;
  const double q = static_cast<double>(k) / static_cast<double>(V);
  const int64_t rank = static_cast<int64_t>(
      std::ceil(m * q + 4.0 * std::sqrt(m * q * (1.0 - q)) + 8.0));  // 1-based, from the top
  if (rank >= m) return 0;
  uint32_t* sampled = room(s.sampled, m);
  for (int64_t j = 0; j < m; ++j) {
    // a cache line apart: prefetched ahead, the loads do not wait one by one on memory
    __builtin_prefetch(x + (j + 16) * kStride);
    sampled[j] = order_key(x[j * kStride]);
  }
  return kth_largest(sampled, m, rank, s).key;  // radix select: no mispredicted partitions
}

// The top k of x[0, V) into s.w / s.ids, in vocabulary order (of several keys equal to the
// k-th the lowest ids); returns the row's largest logit. The keys at or above a sampled floor
// (the table's keys_at_least: one vectorised pass) are the candidates; if fewer than k pass,
// the floor was too high and every key is a candidate. The k-th key is then selected among
// the candidates only.
float select_top_k(const float* x, int64_t V, int64_t k, int64_t row, Scratch& s) {
  const TileKernels& kern = tile_kernels();
  uint32_t floor = sampled_floor(x, V, k, s);
  s.keys.resize(V + kPad);
  s.cand_ids.resize(V + kPad);
  uint32_t* keys = s.keys.data();
  int32_t* cand = s.cand_ids.data();
  uint32_t lo = 0, hi = 0;
  int64_t n = kern.keys_at_least(x, V, floor, keys, cand, &lo, &hi);
  check_row(hi > kInfKey || lo < kMinusInfKey, hi, row);  // keys beyond +-inf: NaN
  if (n < k) n = kern.keys_at_least(x, V, floor = 0, keys, cand, &lo, &hi);
  const KthKey kth = kth_largest(keys, n, k, s);
  float* w = room(s.w, k);
  int32_t* ids = room(s.ids, k);
  int64_t c = 0;
  if (kth.ties == kth.equal) {  // every key >= the k-th survives: one vectorised compaction
    uint32_t* kept = room(s.narrowed, n);
    c = kern.keys_between(keys, cand, n, kth.key, ~0u, kept, ids);
    for (int64_t j = 0; j < c; ++j) w[j] = from_order_key(kept[j]);
  } else {  // some keys tied at the k-th do not: the lowest ids of them do
    int64_t ties = kth.ties;
    for (int64_t j = 0; j < n; ++j) {  // without branches: which candidates survive is data
      const bool tie = keys[j] == kth.key;
      const bool keep = keys[j] > kth.key || (tie && ties > 0);
      ties -= tie & keep;
      ids[c] = cand[j];
      w[c] = from_order_key(keys[j]);  // = x[cand[j]], without a gather
      c += keep && c < k;  // (never past k, were the select wrong: the check below says so)
    }
  }
  TORCH_INTERNAL_ASSERT(c == k, "sample_rows: selected ", c, " of the top ", k);
  return from_order_key(hi);
}

// Nucleus bins: 2^(23 - kBinShift) = 256 per octave below the largest weight (1), over
// kBins / 256 = 30 octaves; smaller weights (and 0) share the last bin. A float >= 0 read
// as an integer grows with its value, so a bin is a shift of that integer.
constexpr int kBinShift = 15;
constexpr int64_t kBins = 256 * 30;
constexpr uint32_t kOneBits = 0x3F800000u;  // 1.0f

inline int64_t weight_bin(float w) {
  uint32_t u;
  std::memcpy(&u, &w, sizeof u);
  return std::min<int64_t>((kOneBits - std::min(u, kOneBits)) >> kBinShift, kBins - 1);
}

// The smallest weight the nucleus keeps: by descending weight, a token is kept while the
// weight before it stays below `mass` (the first, of weight 1, always is).
float nucleus_threshold(const float* w, int64_t n, double mass, Scratch& s) {
  s.mass.assign(kBins, 0.f);  // float: 30 KB, in L1 (the walk below sums them in double)
  for (int64_t c = 0; c < n; ++c) s.mass[weight_bin(w[c])] += w[c];
  double before = 0.0;
  int64_t last = 0;
  for (; last < kBins - 1 && before + s.mass[last] < mass; ++last) before += s.mass[last];
  // the weights of bin `last` (a range of their bits; the last bin reaches down to 0),
  // compacted as bits: floats >= 0 sort as their bits do
  const uint32_t top = kOneBits - static_cast<uint32_t>(last << kBinShift);
  const uint32_t bottom = last == kBins - 1 ? 0u : top - (1u << kBinShift) + 1;
  uint32_t* members = room(s.members, n);
  const int64_t count = tile_kernels().keys_between(reinterpret_cast<const uint32_t*>(w), nullptr,
                                                    n, bottom, top, members, nullptr);
  if (count == 0) return 0.f;  // the bins' sums fell short of the mass by rounding: keep all
  std::sort(members, members + count, std::greater<uint32_t>());
  float threshold = bits_to_float(members[0]);
  for (int64_t j = 0; j < count; ++j) {
    if (before >= mass) break;
    threshold = bits_to_float(members[j]);
    before += threshold;
  }
  return threshold;
}

// The inverse CDF walks the kept weights in chunks of kChunk: the chunks' masses (summed
// vectorised) find the chunk where the CDF passes the target, and only that chunk is walked
// token by token (in double), instead of half the row on average.
constexpr int64_t kChunk = 256;

// Per chunk of w[0, n), the mass of its kept tokens (w >= cut, and > 0) into chunk_mass;
// returns their sum.
double kept_mass(const float* w, int64_t n, float cut, std::vector<double>& chunk_mass) {
  double* mass = room(chunk_mass, (n + kChunk - 1) / kChunk);
  double kept = 0.0;
  for (int64_t lo = 0, c = 0; lo < n; lo += kChunk, ++c) {
    const int64_t hi = std::min(n, lo + kChunk);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = lo; i < hi; ++i) sum += w[i] >= cut ? w[i] : 0.f;
    mass[c] = sum;
    kept += sum;
  }
  return kept;
}

// The first kept token at which the CDF of the kept weights in vocabulary order passes
// target; or, where none does (target rounded up to the total), the last kept token.
int64_t inverse_cdf(const float* w, int64_t n, float cut, double target,
                    const double* chunk_mass) {
  double cdf = 0.0;
  int64_t lo = 0;
  for (int64_t c = 0; lo < n && cdf + chunk_mass[c] <= target; lo += kChunk, ++c)
    cdf += chunk_mass[c];
  int64_t last = -1;
  for (int64_t i = lo; i < n; ++i) {  // the chunk's float mass may round: walk on if need be
    if (w[i] < cut || w[i] == 0.f) continue;
    cdf += w[i];
    last = i;
    if (cdf > target) return i;
  }
  for (int64_t i = std::min(lo, n) - 1; last < 0 && i >= 0; --i)  // past every chunk: the last
    if (w[i] >= cut && w[i] > 0.f) last = i;  // kept token
  return last;
}

int64_t sample_row(const float* x, int64_t V, int64_t k, double top_p, float scale2, double u,
                   int64_t row, Scratch& s) {
  const bool top_k = 0 < k && k < V;
  const int64_t n = top_k ? k : V;
  float top = x[0];
  if (top_k) {
    top = select_top_k(x, V, k, row, s);
  } else {
    s.w.assign(x, x + V);
    int64_t nan = 0;
#pragma omp simd reduction(max : top) reduction(+ : nan)
    for (int64_t i = 0; i < V; ++i) {
      top = x[i] > top ? x[i] : top;
      nan += x[i] != x[i];
    }
    check_row(nan > 0, order_key(top), row);
  }
  float* w = s.w.data();
  const float total = tile_kernels().exp2_sum(w, n, top, scale2);
  const float cut = top_p < 1.0 ? nucleus_threshold(w, n, top_p * total, s) : 0.f;
  const double kept = kept_mass(w, n, cut, s.chunk_mass);
  const int64_t last = inverse_cdf(w, n, cut, u * kept, s.chunk_mass.data());
  return top_k ? s.ids[last] : last;
}

}  // namespace

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& uniform, int64_t top_k,
                       double top_p, double temperature) {
  check_sample_inputs(logits, uniform, top_k, top_p, temperature);
  const at::Tensor x = logits.contiguous();
  const at::Tensor u = uniform.to(at::kDouble).contiguous();
  const int64_t R = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({R}, logits.options().dtype(at::kLong));
  const float* xs = x.const_data_ptr<float>();
  const double* us = u.const_data_ptr<double>();
  int64_t* ids = out.data_ptr<int64_t>();
  const float scale2 = static_cast<float>(1.4426950408889634 / temperature);  // log2(e) / T
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    // kept per thread across calls: fresh buffers of V floats would be page-faulted in anew
    thread_local Scratch s;
    for (int64_t r = r0; r < r1; ++r)
      ids[r] = sample_row(xs + r * V, V, top_k, top_p, scale2, us[r], r, s);
  });
  return out;
}

}  // namespace nbp_mega::cpu
