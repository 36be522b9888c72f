// 2^f for |f| <= 1/2, shared by the SIMD exp2s (they split x = n + f with n = round(x), call
// this, and add n into the exponent bits): the Taylor series of exp(f ln 2) to degree 6
// (truncation error < 1.3e-7 relative, about 1 ulp), by Horner's rule over a vector policy.
//
// Like tile_kernels_impl.h, this is included after a `#pragma GCC target` inside a namespace
// unique to the instruction set, so it is compiled for that instruction set and includes
// nothing. `Vec` provides V, set1 and fmadd.

template <class Vec>
inline typename Vec::V exp2_fraction(typename Vec::V f) {
  typename Vec::V p = Vec::set1(1.540353039338161e-4f);  // (ln 2)^k / k!, k = 6 .. 0
  p = Vec::fmadd(p, f, Vec::set1(1.333355814642844e-3f));
  p = Vec::fmadd(p, f, Vec::set1(9.618129107628477e-3f));
  p = Vec::fmadd(p, f, Vec::set1(5.550410866482158e-2f));
  p = Vec::fmadd(p, f, Vec::set1(2.402265069591007e-1f));
  p = Vec::fmadd(p, f, Vec::set1(6.931471805599453e-1f));
  return Vec::fmadd(p, f, Vec::set1(1.f));
}
