// Portable instantiation of the tile loops (one float per "vector"; the compiler vectorises
// what it can), and the run-time choice between it and the AVX2 / AVX-512 tables.
//
// Legend: W = 1 float per vector.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_kernels.h"

namespace nbp_mega::cpu {
namespace generic {

struct Scalar {
  using V = float;
  static constexpr int W = 1;
  static constexpr int MR = 3;  // 3 x 4 scalar accumulators: what the compiler keeps in registers
  static constexpr int NV = 4;
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V set1(float x) { return x; }
  static V zero() { return 0.f; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V fmsub(V a, V b, V c) { return a * b - c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return __builtin_fmaxf(a, b); }
  static V exp2(V x) { return __builtin_exp2f(x); }
  static float reduce_max(V v) { return v; }
  static float reduce_add(V v) { return v; }
};

#include "order_keys.h"
#include "tile_kernels_impl.h"

constexpr TileKernels kTable = TileImpl<Scalar>::table("generic");

}  // namespace generic

const TileKernels& generic_kernels() { return generic::kTable; }

const TileKernels& tile_kernels() {
  // Decided once (thread-safe static): the widest table the CPU runs. NBP_CPU_ISA=avx2 or
  // generic caps the choice, which is how the tests check the narrower tables on a wider CPU.
  static const TileKernels* chosen = []() -> const TileKernels* {
    const char* forced = std::getenv("NBP_CPU_ISA");
    const bool generic = forced != nullptr && std::strcmp(forced, "generic") == 0;
    const bool avx2 = forced != nullptr && std::strcmp(forced, "avx2") == 0;
    if (generic) return nullptr;
    const TileKernels* wide = avx2 ? nullptr : avx512_kernels();
    return wide != nullptr ? wide : avx2_kernels();
  }();
  return chosen != nullptr ? *chosen : generic_kernels();
}

}  // namespace nbp_mega::cpu
