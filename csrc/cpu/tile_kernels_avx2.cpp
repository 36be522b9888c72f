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

#include "exp2_fraction.h"
#include "order_keys.h"

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  // 3 rows x 4 vectors: 12 accumulators + 4 loads of B + 1 broadcast of A fit the 16 AVX2
  // registers; measured fastest of 6x2, 4x3 and 3x4 on the development machine (Zen).
  static constexpr int MR = 3;
  static constexpr int NV = 4;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V zero() { return _mm256_setzero_ps(); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fmsub(V a, V b, V c) { return _mm256_fmsub_ps(a, b, c); }
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

  // 2^x = 2^n 2^f with n = round(x) and |f| <= 1/2; 2^f from exp2_fraction.h (degree-6
  // Taylor polynomial, about 1 ulp); n is added straight into the exponent bits of 2^f. Below -125 the result is exactly 0 (a score far below the row
  // max contributes nothing, and 2^n stays a normal float). The softmax calls it with x <= ~0,
  // so there is no overflow guard: x >= 128 would be wrong.
  static V exp2(V x) {
    const V lo = set1(-125.f);
    const V xc = _mm256_max_ps(x, lo);
    const V n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = sub(xc, n);
    const V p = exp2_fraction<Avx2>(f);
    const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p),
                                            _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
    return _mm256_blendv_ps(_mm256_castsi256_ps(scaled), zero(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
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
