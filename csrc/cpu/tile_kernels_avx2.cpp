// AVX2+FMA instantiation of the tile loops (x86-64 with GCC; elsewhere avx2_kernels() is
// nullptr). The file is compiled for AVX2 through `#pragma GCC target` instead of a -mavx2
// flag so that the rest of the extension still runs on any x86-64 CPU; tile_kernels() checks
// the CPU before handing this table out.
//
// Legend: W = 8 floats per __m256 register.
#include <cstdint>

#include "tile_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NBP_HAVE_AVX2_KERNELS 1
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace nbp_mega::cpu::avx2 {

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }

  static float reduce_max(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }

  static float reduce_add(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }

  // exp(x) = 2^n exp(r) with n = round(x / ln 2) and |r| <= ln(2) / 2; exp(r) from its Taylor
  // series to r^6 (truncation error < 2e-7 relative, about 1 ulp); 2^n is written straight
  // into the exponent bits. Below ln(FLT_MIN) the result is exactly 0 (masked scores must
  // contribute nothing), above 88 it saturates near FLT_MAX (softmax inputs are <= ~0).
  static V exp(V x) {
    const V lo = set1(-87.33654475f), hi = set1(88.0f);
    const V xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    const V n = _mm256_round_ps(mul(xc, set1(1.44269504f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // r = x - n ln2, with ln2 split in a part exact in float and a correction
    V r = _mm256_fnmadd_ps(n, set1(0.693359375f), xc);
    r = _mm256_fnmadd_ps(n, set1(-2.12194440e-4f), r);
    V p = set1(1.f / 720);
    p = fmadd(p, r, set1(1.f / 120));
    p = fmadd(p, r, set1(1.f / 24));
    p = fmadd(p, r, set1(1.f / 6));
    p = fmadd(p, r, set1(0.5f));
    p = fmadd(p, r, set1(1.f));
    p = fmadd(p, r, set1(1.f));
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const V result = mul(p, _mm256_castsi256_ps(bits));
    return _mm256_blendv_ps(result, zero(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  }
};

#include "tile_kernels_impl.h"

constexpr TileKernels kTable = TileImpl<Avx2>::table("avx2");

}  // namespace nbp_mega::cpu::avx2

#pragma GCC pop_options
#endif

namespace nbp_mega::cpu {

const TileKernels* avx2_kernels() {
#if defined(NBP_HAVE_AVX2_KERNELS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2::kTable;
#endif
  return nullptr;
}

}  // namespace nbp_mega::cpu
