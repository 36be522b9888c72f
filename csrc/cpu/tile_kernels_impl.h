// The tile loops of tile_kernels.h, written once over a vector policy `Vec` and instantiated
// per instruction set by tile_kernels_avx512.cpp, tile_kernels_avx2.cpp and
// tile_kernels_generic.cpp.
//
// Legend: M, N, K sizes of C[M, N] (+)= A[M, K] B[K, N]; W = Vec::W floats per vector;
// MR x NV the register block of the GEMM (MR rows of C, NV vectors of W columns).
//
// This header is included after a `#pragma GCC target` in the AVX2 and AVX-512 files, so it includes no
// standard header and calls no inline library function (only compiler builtins): an inline
// function instantiated here under AVX2 could otherwise be merged by the linker with the
// portable copy and run AVX2 code on a CPU without it. Include it inside a namespace that is
// unique to the instruction set.
//
// `Vec` provides: V, W, MR, NV, load, store, set1, zero, add, fmadd, fmsub, mul, sub, max, exp2,
// reduce_max, reduce_add (and optionally keys_at_least, keys_between). W must divide kPad (rows
// are padded to kPad floats). exp2_fraction.h and order_keys.h come first, in the same namespace.

template <class Vec>
struct TileImpl {
  using V = typename Vec::V;
  static constexpr int W = Vec::W;
  // The GEMM register block comes with the instruction set (it depends on how many vector
  // registers there are): MR rows x NV vectors of accumulators.
  static constexpr int MR = Vec::MR;
  static constexpr int NV = Vec::NV;

  // C[R, NVr * W] (+)= A[R, K] B[K, NVr * W], all accumulators in registers.
  template <int R, int NVr>
  static void micro(int64_t K, const float* a, int64_t a_row, int64_t a_col, const float* b,
                    int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    V acc[R][NVr];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NVr; ++v)
        acc[i][v] = accumulate ? Vec::load(c + i * ldc + v * W) : Vec::zero();
    for (int64_t k = 0; k < K; ++k) {
      V bk[NVr];
#pragma GCC unroll 8
      for (int v = 0; v < NVr; ++v) bk[v] = Vec::load(b + k * ldb + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const V ai = Vec::set1(a[i * a_row + k * a_col]);
#pragma GCC unroll 8
        for (int v = 0; v < NVr; ++v) acc[i][v] = Vec::fmadd(ai, bk[v], acc[i][v]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NVr; ++v) Vec::store(c + i * ldc + v * W, acc[i][v]);
  }

  // One panel of NVr * W columns of C, all M rows: B's panel stays in L1 across the rows.
  template <int NVr>
  static void panel(int64_t M, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                    const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR)
      micro<MR, NVr>(K, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc, accumulate);
    rows_left<NVr, MR - 1>(M - i, K, a + i * a_row, a_row, a_col, b, ldb, c + i * ldc, ldc,
                           accumulate);
  }

  // The last 0 .. MR - 1 rows of a panel: micro<rows, NVr>, picked at compile time.
  template <int NVr, int R>
  static void rows_left(int64_t rows, int64_t K, const float* a, int64_t a_row, int64_t a_col,
                        const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate) {
    if constexpr (R > 0) {
      if (rows == R) return micro<R, NVr>(K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
      rows_left<NVr, R - 1>(rows, K, a, a_row, a_col, b, ldb, c, ldc, accumulate);
    }
  }

  static void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t a_row,
                   int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc,
                   bool accumulate) {
    int64_t j = 0;
    for (; j + NV * W <= N; j += NV * W)
      panel<NV>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate);
    switch ((N - j) / W) {  // 0 .. NV - 1 vectors left (N is a multiple of W)
      case 3: panel<3>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate); break;
      case 2: panel<2>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate); break;
      case 1: panel<1>(M, K, a, a_row, a_col, b + j, ldb, c + j, ldc, accumulate); break;
      default: break;
    }
  }

  static void fill_zero(float* x, int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) x[c] = 0.f;
  }

  static float softmax_step(float* s, int64_t visible, int64_t width, float scale2, float* m,
                            float* l) {
    if (visible == 0) {  // the row sees no key of this tile: nothing changes
      fill_zero(s, 0, width);
      return 1.f;
    }
    const int64_t vec_end = visible / W * W;
    V vmax = Vec::set1(-__builtin_inff());
    for (int64_t c = 0; c < vec_end; c += W) vmax = Vec::max(vmax, Vec::load(s + c));
    float row_max = Vec::reduce_max(vmax);
    for (int64_t c = vec_end; c < visible; ++c) row_max = __builtin_fmaxf(row_max, s[c]);
    // scale2 > 0 (the op checks scale), so max(scale2 * s) = scale2 * max(s).
    const float m_new = __builtin_fmaxf(*m, scale2 * row_max);
    const float alpha = __builtin_exp2f(*m - m_new);  // 0 on the first tile (*m = -inf)
    const V vscale = Vec::set1(scale2), vm = Vec::set1(m_new);
    V vsum = Vec::zero();
    for (int64_t c = 0; c < vec_end; c += W) {
      const V p = Vec::exp2(Vec::fmsub(Vec::load(s + c), vscale, vm));
      Vec::store(s + c, p);
      vsum = Vec::add(vsum, p);
    }
    float sum = Vec::reduce_add(vsum);
    for (int64_t c = vec_end; c < visible; ++c) {
      s[c] = __builtin_exp2f(scale2 * s[c] - m_new);
      sum += s[c];
    }
    fill_zero(s, visible, width);
    *l = *l * alpha + sum;
    *m = m_new;
    return alpha;
  }

  static void probs(float* s, const float* lse2, int64_t hidden, int64_t visible_end,
                    int64_t width, float scale2) {
    fill_zero(s, 0, hidden);
    int64_t c = hidden;
    const V vscale = Vec::set1(scale2);
    for (; c + W <= visible_end; c += W) {
      const V x = Vec::fmsub(Vec::load(s + c), vscale, Vec::load(lse2 + c));
      Vec::store(s + c, Vec::exp2(x));
    }
    for (; c < visible_end; ++c) s[c] = __builtin_exp2f(scale2 * s[c] - lse2[c]);
    fill_zero(s, visible_end, width);
  }

  static void dscores(float* dp, const float* p, const float* delta, int64_t width) {
    for (int64_t c = 0; c < width; c += W) {
      const V d = Vec::sub(Vec::load(dp + c), Vec::load(delta + c));
      Vec::store(dp + c, Vec::mul(Vec::load(p + c), d));
    }
  }

  static void scale(float* x, int64_t width, float alpha) {
    const V va = Vec::set1(alpha);
    for (int64_t c = 0; c < width; c += W) Vec::store(x + c, Vec::mul(Vec::load(x + c), va));
  }

  static float exp2_sum(float* x, int64_t n, float shift, float scale2) {
    const V vshift = Vec::set1(shift), vscale = Vec::set1(scale2);
    V vsum = Vec::zero();
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      const V p = Vec::exp2(Vec::mul(Vec::sub(Vec::load(x + c), vshift), vscale));
      Vec::store(x + c, p);
      vsum = Vec::add(vsum, p);
    }
    float sum = Vec::reduce_add(vsum);
    for (; c < n; ++c) {
      x[c] = __builtin_exp2f((x[c] - shift) * scale2);
      sum += x[c];
    }
    return sum;
  }

  // Portable: one key at a time, without branches (which keys pass is data: unpredictable).
  // An instruction set with a compress instruction provides Vec::keys_at_least instead.
  static int64_t keys_at_least(const float* x, int64_t n, uint32_t floor, uint32_t* keys,
                               int32_t* ids, uint32_t* lo, uint32_t* hi) {
    if constexpr (requires { Vec::keys_at_least; }) {
      return Vec::keys_at_least(x, n, floor, keys, ids, lo, hi);
    } else {
      *lo = ~0u;
      *hi = 0;
      return append_keys_at_least(x, 0, n, floor, keys, ids, 0, lo, hi);
    }
  }

  // Portable as keys_at_least (order_keys.h's loop), or the instruction set's compress.
  static int64_t keys_between(const uint32_t* keys, const int32_t* ids, int64_t n, uint32_t lo,
                              uint32_t hi, uint32_t* out, int32_t* out_ids) {
    if constexpr (requires { Vec::keys_between; }) {
      return Vec::keys_between(keys, ids, n, lo, hi, out, out_ids);
    } else {
      return append_keys_between(keys, ids, 0, n, lo, hi, out, out_ids, 0);
    }
  }

  // constexpr: the table is built at compile time, so loading the library runs no code of
  // the AVX2 instantiation on a CPU that may lack AVX2.
  static constexpr TileKernels table(const char* isa) {
    return TileKernels{isa,    &gemm,     &softmax_step,  &probs,       &dscores,
                       &scale, &exp2_sum, &keys_at_least, &keys_between};
  }
};
