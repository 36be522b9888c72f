// CPU sampler: one token per row of logits, by the inverse CDF of the distribution that
// nbp_mega.generate.sampling.filter_logits specifies (temperature, the top-k tokens, then
// top-p over the renormalised survivors), in O(V) per row and without sorting.
//
// Legend: R rows (batch x positions); V vocabulary; k top-k; n survivors of top-k (k, or V
// without top-k); key = a float's bits mapped to an unsigned integer of the same order.
//
// Per row, on one thread (rows are split over torch's intra-op threads):
//   1. top-k: a radix select of the k-th largest key, 11 + 11 + 10 bits: a histogram pass
//      over V, a pass that writes the tokens of the bins above the k-th key's straight to the
//      survivors and those of its bin to candidates, then passes over the candidates only;
//      the survivors: those tokens in vocabulary order, then the candidates above the k-th
//      key and, of those equal to it, the lowest-numbered ones until there are k;
//   2. weights 2^((x - max) log2(e) / T) (the table's exp2_sum, vectorised);
//   3. top-p: a histogram of the weights' mass over 256 bins per octave finds the bin where
//      the nucleus ends; only that bin's weights are sorted to find the exact cut (a token is
//      kept while the weight of the heavier tokens before it stays below top_p * total);
//   4. the inverse CDF at u over the kept tokens in the survivors' order (a fixed order that
//      depends on the row's logits alone), summed in double.
// Ties: of several tokens tied at the top-p cut all are kept (as sampling.py's torch path);
// the top-k tie-break (lowest ids) may differ from torch.topk's.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../sampling.h"
#include "tile_kernels.h"

namespace nbp_mega::cpu {
namespace {

inline uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The bin, counted from the top, where `want` is reached by counts[] summed downwards;
// `want` becomes the count still wanted inside that bin.
template <class Count>
int64_t bin_reaching(const Count* counts, int64_t bins, int64_t& want) {
  for (int64_t b = bins - 1; b > 0; --b) {
    if (want <= static_cast<int64_t>(counts[b])) return b;
    want -= counts[b];
  }
  return 0;
}

struct Scratch {
  std::vector<uint32_t> hist, keys, narrowed;
  std::vector<float> w, members;
  std::vector<int32_t> ids, cand_ids;
  std::vector<double> mass;
};

// Keys of +-inf: a key above the first or below the second is a NaN.
constexpr uint32_t kInfKey = 0xFF800000u, kMinusInfKey = 0x007FFFFFu;
constexpr int64_t kTopBins = 2048;  // the first radix level: a key's top 11 bits

// Checks a row's key range: no NaN, and a finite largest logit.
void check_row(uint32_t lo, uint32_t hi, int64_t row) {
  TORCH_CHECK_VALUE(hi <= kInfKey && lo >= kMinusInfKey, "sample_rows: row ", row,
                    " of the logits holds NaN");
  TORCH_CHECK_VALUE(hi != kInfKey && hi > kMinusInfKey, "sample_rows: row ", row,
                    " has no finite largest logit (+inf or all -inf)");
}

// The top k of x[0, V) into s.w / s.ids (the n = k survivors: first every key whose top 11
// bits lie above the k-th key's, in vocabulary order, then those of the k-th key's bin that
// make the count k, in vocabulary order; of several keys equal to the k-th the lowest ids).
void select_top_k(const float* x, int64_t V, int64_t k, int64_t row, Scratch& s) {
  // two interleaved histograms: consecutive keys of one bin do not wait on each other's
  // increment (store-to-load forwarding)
  s.hist.assign(2 * kTopBins, 0);
  uint32_t* h0 = s.hist.data();
  uint32_t* h1 = h0 + kTopBins;
  uint32_t lo = ~0u, hi = 0;
  int64_t i = 0;
  for (; i + 2 <= V; i += 2) {
    const uint32_t a = order_key(x[i]), b = order_key(x[i + 1]);
    ++h0[a >> 21];
    ++h1[b >> 21];
    lo = std::min(lo, std::min(a, b));
    hi = std::max(hi, std::max(a, b));
  }
  for (; i < V; ++i) {
    const uint32_t a = order_key(x[i]);
    ++h0[a >> 21];
    lo = std::min(lo, a);
    hi = std::max(hi, a);
  }
  check_row(lo, hi, row);
  for (int64_t b = 0; b < kTopBins; ++b) h0[b] += h1[b];
  int64_t want = k;
  const uint32_t top = bin_reaching(h0, kTopBins, want);
  const int64_t above = k - want;  // keys in the bins above `top`: all survive
  // one pass, no branches (survivors sit at random ids): the keys above `top` go straight to
  // the survivors, those of bin `top` to the candidates
  s.w.resize(k + 1);  // + 1: each loop writes one past its last element
  s.ids.resize(k + 1);
  s.keys.resize(h0[top] + 1);
  s.cand_ids.resize(h0[top] + 1);
  float* w = s.w.data();
  int32_t* ids = s.ids.data();
  uint32_t* keys = s.keys.data();
  int32_t* cand = s.cand_ids.data();
  int64_t c = 0, d = 0;
  for (i = 0; i < V; ++i) {
    const uint32_t key = order_key(x[i]), bin = key >> 21;
    ids[c] = static_cast<int32_t>(i);
    w[c] = x[i];
    c += bin > top;
    keys[d] = key;
    cand[d] = static_cast<int32_t>(i);
    d += bin == top;
  }
  // the k-th key among the candidates: the remaining 21 bits, 11 then 10
  std::vector<uint32_t>& left = s.narrowed;
  left.assign(keys, keys + d);
  uint32_t prefix = top;
  for (const int bits : {11, 10}) {
    const int shift = bits == 11 ? 10 : 0;
    const uint32_t mask = (1u << bits) - 1;
    s.hist.assign(size_t{1} << bits, 0);
    for (const uint32_t key : left) ++s.hist[(key >> shift) & mask];
    prefix = (prefix << bits) | bin_reaching(s.hist.data(), int64_t{1} << bits, want);
    left.erase(std::remove_if(left.begin(), left.end(),
                              [&](uint32_t key) { return (key >> shift) != prefix; }),
               left.end());
  }
  // `prefix` is the k-th key; `want` of the keys equal to it survive
  for (int64_t j = 0; j < d; ++j) {
    const bool tie = keys[j] == prefix;
    const bool keep = keys[j] > prefix || (tie && want > 0);
    want -= tie & keep;
    ids[c] = cand[j];
    w[c] = x[cand[j]];
    c += keep && c < k;  // (never past k, were the select wrong: the check below says so)
  }
  TORCH_INTERNAL_ASSERT(c == k && above <= k, "sample_rows: selected ", c, " of top ", k);
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
  s.mass.assign(kBins, 0.0);
  for (int64_t c = 0; c < n; ++c) s.mass[weight_bin(w[c])] += w[c];
  double before = 0.0;
  int64_t last = 0;
  for (; last < kBins - 1 && before + s.mass[last] < mass; ++last) before += s.mass[last];
  s.members.clear();
  for (int64_t c = 0; c < n; ++c)
    if (weight_bin(w[c]) == last) s.members.push_back(w[c]);
  std::sort(s.members.begin(), s.members.end(), std::greater<float>());
  float threshold = s.members.front();
  for (const float m : s.members) {
    if (before >= mass) break;
    threshold = m;
    before += m;
  }
  return threshold;
}

int64_t sample_row(const float* x, int64_t V, int64_t k, double top_p, float scale2, double u,
                   int64_t row, Scratch& s) {
  const bool top_k = 0 < k && k < V;
  const int64_t n = top_k ? k : V;
  if (top_k) {
    select_top_k(x, V, k, row, s);
  } else {
    s.w.assign(x, x + V);
    const auto [lo, hi] = std::minmax_element(s.w.begin(), s.w.end(), [](float a, float b) {
      return order_key(a) < order_key(b);
    });
    check_row(order_key(*lo), order_key(*hi), row);
  }
  float* w = s.w.data();
  float top = w[0];
#pragma omp simd reduction(max : top)
  for (int64_t c = 1; c < n; ++c) top = w[c] > top ? w[c] : top;
  const float total = tile_kernels().exp2_sum(w, n, top, scale2);
  float cut = 0.f;
  double kept = total;
  if (top_p < 1.0) {
    cut = nucleus_threshold(w, n, top_p * total, s);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < n; ++c) sum += w[c] >= cut ? w[c] : 0.f;
    kept = sum;
  }
  const double target = u * kept;
  double cdf = 0.0;
  int64_t last = 0;
  for (int64_t c = 0; c < n; ++c) {
    if (w[c] < cut || w[c] == 0.f) continue;
    cdf += w[c];
    last = c;
    if (cdf > target) break;
  }
  // `last`: the first token whose CDF passes u * kept, or (u * kept rounding up to the sum)
  // the last token of weight > 0
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
