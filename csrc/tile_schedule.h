// The block-causal tile schedule, shared by the CPU and CUDA kernels (and by the
// `nbp_mega::tile_schedule` op that lets the tests check it against the dense mask).
//
// Legend: Sq queries, Sk keys, L block length, P prefix length, q_offset the position of query
// row 0 in the key sequence; r a query row (relative to q), j a key index; a tile is a
// [q0, q1) x [k0, k1) rectangle of the Sq x Sk score matrix.
//
// Visibility (the specification is nbp_mega/ops/reference.py): the query at position p sees
// keys [0, end(p)), end(p) = P for p < P, else P + ((p - P) / L + 1) * L. end() is
// non-decreasing in p, which is everything the schedule relies on:
//   - the first row of a query tile sees the fewest keys and the last row the most, so a tile
//     is entirely visible iff k1 <= key_end(q0) and entirely hidden iff k0 >= key_end(q1 - 1);
//   - the rows that see key j are a suffix [first_query(j), Sq) of the queries.
// Inside a tile each row sees a prefix of the tile's keys and each key is seen by a suffix of
// its rows, so a straddling tile is masked by one count per row, not by an element-wise mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NBP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NBP_HOST_DEVICE inline
#endif

namespace nbp_mega {

enum TileClass : int8_t { kTileSkip = 0, kTileFull = 1, kTilePartial = 2 };

NBP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
NBP_HOST_DEVICE int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

struct BlockCausalSchedule {
  int64_t sq, sk, block_len, prefix_len, q_offset;

  // Exclusive end of the keys that query row r sees, clamped to the keys that exist.
  NBP_HOST_DEVICE int64_t key_end(int64_t r) const {
    const int64_t p = q_offset + r;
    const int64_t end =
        p < prefix_len ? prefix_len : prefix_len + ((p - prefix_len) / block_len + 1) * block_len;
    return end < sk ? end : sk;
  }

  // First query row that sees key j (Sq if none does). Prefix keys are seen by every row; key
  // j of block b = (j - P) / L is seen from the first position of that block on.
  NBP_HOST_DEVICE int64_t first_query(int64_t j) const {
    const int64_t first_pos =
        j < prefix_len ? 0 : prefix_len + (j - prefix_len) / block_len * block_len;
    return clamp64(first_pos - q_offset, 0, sq);
  }

  NBP_HOST_DEVICE TileClass classify(int64_t q0, int64_t q1, int64_t k0, int64_t k1) const {
    if (k0 >= key_end(q1 - 1)) return kTileSkip;
    if ((k1 < sk ? k1 : sk) <= key_end(q0)) return kTileFull;
    return kTilePartial;
  }

  // Forward (query-tile major): the query tile [q0, q1) visits key tiles [0, this count) of
  // width bk, in order; tile 0 holds key 0, which every row sees, so the running max of the
  // online softmax is finite after the first tile.
  NBP_HOST_DEVICE int64_t key_tiles(int64_t q0, int64_t q1, int64_t bk) const {
    return ceil_div(key_end(q1 - 1), bk);
  }

  // Backward (key-tile major): the key tile starting at k0 visits query tiles
  // [this index, ceil(Sq / bq)) of height bq: its first key is the one seen by the most rows.
  // A key no query sees (keys past the last query's block) visits none.
  NBP_HOST_DEVICE int64_t first_query_tile(int64_t k0, int64_t bq) const {
    const int64_t r = first_query(k0);
    return r < sq ? r / bq : ceil_div(sq, bq);
  }

  // Keys [k0, k0 + this) of a tile are visible to row r (a prefix of the tile's `width` keys).
  NBP_HOST_DEVICE int64_t visible_keys(int64_t r, int64_t k0, int64_t width) const {
    return clamp64(key_end(r) - k0, 0, width);
  }

  // Rows [q0 + this, q0 + height) of a tile see key j (a suffix of the tile's rows).
  NBP_HOST_DEVICE int64_t hidden_rows(int64_t j, int64_t q0, int64_t height) const {
    return clamp64(first_query(j) - q0, 0, height);
  }
};

}  // namespace nbp_mega
