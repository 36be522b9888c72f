// The sampler's order keys (a float's bits mapped to a uint32 of the same order: negative
// floats have every bit flipped, the others the sign bit set), and the scalar loops of the
// compactions `TileKernels::keys_at_least` and `keys_between`, shared by the portable loops
// and the AVX-512 tails.
//
// Like exp2_fraction.h, included inside a namespace unique to the instruction set, after its
// `#pragma GCC target` (and by sampling_cpu.cpp, for its own scalar passes, in its anonymous
// namespace); it includes nothing and calls only compiler builtins.

inline uint32_t order_key_bits(uint32_t u) { return (u & 0x80000000u) ? ~u : (u | 0x80000000u); }

// Keys of x[i, n) >= floor, with their indices, appended at keys[c], ids[c] (without
// branches: which keys pass is data); *lo, *hi widened to their range. Returns the new count.
inline int64_t append_keys_at_least(const float* x, int64_t i, int64_t n, uint32_t floor,
                                    uint32_t* keys, int32_t* ids, int64_t c, uint32_t* lo,
                                    uint32_t* hi) {
  uint32_t l = *lo, h = *hi;
  for (; i < n; ++i) {
    uint32_t u;
    __builtin_memcpy(&u, x + i, sizeof u);
    const uint32_t key = order_key_bits(u);
    l = key < l ? key : l;
    h = key > h ? key : h;
    keys[c] = key;
    ids[c] = static_cast<int32_t>(i);
    c += key >= floor;
  }
  *lo = l;
  *hi = h;
  return c;
}

// Of keys[i, n), those in [lo, hi], with ids[j] (if ids) or j as their index, appended at
// out[c], out_ids[c] (if out_ids), without branches. Returns the new count.
inline int64_t append_keys_between(const uint32_t* keys, const int32_t* ids, int64_t i,
                                   int64_t n, uint32_t lo, uint32_t hi, uint32_t* out,
                                   int32_t* out_ids, int64_t c) {
  for (; i < n; ++i) {
    const uint32_t key = keys[i];
    out[c] = key;
    if (out_ids) out_ids[c] = ids ? ids[i] : static_cast<int32_t>(i);
    c += (key >= lo) & (key <= hi);
  }
  return c;
}
