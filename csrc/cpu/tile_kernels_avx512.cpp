// AVX-512F instantiation of the tile loops (x86-64 with GCC; elsewhere avx512_kernels() is
// nullptr). Like the AVX2 file it is compiled for its instruction set through
// `#pragma GCC target`, not a flag, and tile_kernels() checks the CPU before using it.
// PyTorch's own CPU kernels use AVX-512 where it exists, so an AVX2-only kernel would give
// away half the vector width against the baselines it is measured with.
//
// Legend: W = 16 floats per __m512 register.
#include <cstdint>

#include "tile_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NBP_HAVE_AVX512_KERNELS 1
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized on its _mm512_undefined_*()
// placeholders (a known false positive); nothing here reads an uninitialised value.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace nbp_mega::cpu::avx512 {

#include "exp2_fraction.h"
#include "order_keys.h"

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  // 6 rows x 4 vectors: 24 accumulators + 4 loads of B + 1 broadcast of A of the 32 registers.
  static constexpr int MR = 6;
  static constexpr int NV = 4;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V zero() { return _mm512_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm512_fmsub_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }

  // Halving folds down to one lane (the intrinsics' own reductions are library inline
  // functions, which this file must not instantiate; see tile_kernels_impl.h).
  static float reduce_max(V v) {
    __m256 y = _mm256_max_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }

  static float reduce_add(V v) {
    __m256 y = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }

  // 2^x as in the AVX2 file: 2^n 2^f, n = round(x), 2^f by its degree-6 Taylor polynomial,
  // n added into the exponent bits; exactly 0 below -125; no overflow guard (x <= ~0 here).
  static V exp2(V x) {
    const V lo = set1(-125.f);
    const V xc = _mm512_max_ps(x, lo);
    const V n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = sub(xc, n);
    const V p = exp2_fraction<Avx512>(f);
    const __m512i scaled = _mm512_add_epi32(_mm512_castps_si512(p),
                                            _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23));
    const __mmask16 below = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    return _mm512_mask_blend_ps(below, _mm512_castsi512_ps(scaled), zero());
  }

  // The sampler's prefilter (tile_kernels.h), 16 keys at a time: the passing keys and ids
  // compressed in a register and stored whole (a compressing store to memory is microcoded
  // and slow on Zen 4).
  static int64_t keys_at_least(const float* x, int64_t n, uint32_t floor, uint32_t* keys,
                               int32_t* ids, uint32_t* lo, uint32_t* hi) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    const __m512i vfloor = _mm512_set1_epi32(static_cast<int>(floor));
    const __m512i step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i vlo = _mm512_set1_epi32(-1), vhi = _mm512_setzero_si512();
    int64_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i bits = _mm512_loadu_si512(x + i);
      // negative: all bits flipped; positive: the sign bit set
      const __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31),
                                                                 sign));
      vlo = _mm512_min_epu32(vlo, key);
      vhi = _mm512_max_epu32(vhi, key);
      const __mmask16 pass = _mm512_cmpge_epu32_mask(key, vfloor);
      _mm512_storeu_si512(keys + c, _mm512_maskz_compress_epi32(pass, key));
      _mm512_storeu_si512(ids + c, _mm512_maskz_compress_epi32(pass, idx));
      c += __builtin_popcount(pass);
      idx = _mm512_add_epi32(idx, step);
    }
    alignas(64) uint32_t l16[16], h16[16];
    _mm512_store_si512(l16, vlo);
    _mm512_store_si512(h16, vhi);
    *lo = ~0u;
    *hi = 0;
    for (int j = 0; j < 16; ++j) {
      *lo = l16[j] < *lo ? l16[j] : *lo;
      *hi = h16[j] > *hi ? h16[j] : *hi;
    }
    c = append_keys_at_least(x, i, n, floor, keys, ids, c, lo, hi);  // the tail
    return c;
  }

  // The later compactions (tile_kernels.h), 16 keys at a time as keys_at_least. In place
  // (out == keys) is safe: a vector is loaded before anything at or past its start is stored.
  static int64_t keys_between(const uint32_t* keys, const int32_t* ids, int64_t n, uint32_t lo,
                              uint32_t hi, uint32_t* out, int32_t* out_ids) {
    const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
    const __m512i vhi = _mm512_set1_epi32(static_cast<int>(hi));
    const __m512i step = _mm512_set1_epi32(16);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t c = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i key = _mm512_loadu_si512(keys + i);
      const __mmask16 pass = _mm512_cmpge_epu32_mask(key, vlo) &
                             _mm512_cmple_epu32_mask(key, vhi);
      if (out_ids) {
        const __m512i id = ids ? _mm512_loadu_si512(ids + i) : idx;
        _mm512_storeu_si512(out_ids + c, _mm512_maskz_compress_epi32(pass, id));
        idx = _mm512_add_epi32(idx, step);
      }
      _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(pass, key));
      c += __builtin_popcount(pass);
    }
    return append_keys_between(keys, ids, i, n, lo, hi, out, out_ids, c);  // the tail
  }
};

#include "tile_kernels_impl.h"

constexpr TileKernels kTable = TileImpl<Avx512>::table("avx512");

}  // namespace nbp_mega::cpu::avx512

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace nbp_mega::cpu {

const TileKernels* avx512_kernels() {
#if defined(NBP_HAVE_AVX512_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return &avx512::kTable;
#endif
  return nullptr;
}

}  // namespace nbp_mega::cpu
