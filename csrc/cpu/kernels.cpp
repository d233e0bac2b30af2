// CPU kernels (OpenMP). Work units are (sample, channel, run of patch rows). For s = 2, 4, 8 a
// patch row is processed by loops over the whole image width that the compiler vectorises
// (struct Strip); other s use the per-patch math of relayops/patch.h (process_patch). Strip reads
// and writes rows that are contiguous and of the math type in place; other rows go through
// scratch rows (a copy each way), which only strided layouts and half types need.
// With cuda_tiles the CUDA kernels' tile phases (relayops/tile.h) run instead, block by block.
// patch_blur / relay_corrupt use a fused AVX-512 kernel when the CPU has it (BlurRows).
// Noise is produced row by row (struct RowNoise): each row of eps/eps2 is drawn (or read) once,
// its horizontal wraparound box sums go into a ring of 2s rows, and the vertical sums over the
// ring give the block noise of the current patch row, so Philox runs once per pair of elements (plus s - 1
// halo rows per unit). Scratch memory is O(s * W) per thread, never proportional to the input.
// Instruction sets: this file is compiled once per instruction set, as separate translation units
// that build in parallel: by itself it is the portable build (baseline x86-64 or aarch64);
// kernels_avx512.cpp and kernels_avx2.cpp include it with RELAYOPS_ISA_AVX512 / RELAYOPS_ISA_AVX2
// defined (GCC on x86-64). Each build lives in its own namespace (avx512, avx2, portable) and
// exports its entry points as one IsaKernels table (kernels.h); dispatch.cpp calls the table of
// the instruction set cpu_isa() picks at run time, so a cap (set_isa_cap) forces every path,
// written with vector extensions (vector_rows.h: Philox, Box-Muller, fused blur), with intrinsics
// (the AVX-512 fused blur) or left to the compiler's vectoriser alike, on any CPU that has it.
#include "kernels.h"

#include "relayops/tile.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <stdexcept>
#include <vector>

// This build's instruction set: its namespace, the vector width of vector_rows.h and the target of
// everything below (the headers above keep the baseline target, so the inline functions and
// template instances that the three builds share are the same baseline code in each).
#if defined(RELAYOPS_ISA_AVX512)
#define RELAYOPS_ISA avx512
#define RELAYOPS_VECTOR_BYTES 64
#pragma GCC target("avx512f,avx2,fma")
#elif defined(RELAYOPS_ISA_AVX2)
#define RELAYOPS_ISA avx2
#define RELAYOPS_VECTOR_BYTES 32
#pragma GCC target("avx2,fma")
#else
#define RELAYOPS_ISA portable
#define RELAYOPS_VECTOR_BYTES 16
#endif
#if defined(RELAYOPS_X86)
// GCC 12 warns about the intrinsics headers' own _mm512_undefined_* inside the masked builtins.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace relayops {
namespace cpu {
namespace RELAYOPS_ISA {
namespace {

// The vector row loops (Philox, Box-Muller, the fused blur) of this instruction set.
#include "vector_rows.h"

#if defined(RELAYOPS_ISA_AVX512)
constexpr int kIsa = kAvx512;
#elif defined(RELAYOPS_ISA_AVX2)
constexpr int kIsa = kAvx2;
#else
constexpr int kIsa = kPortable;
#endif

// Runs f() with its body, and everything it calls that can be inlined (the compiler-vectorised
// loops of Strip and RowNoise), inlined into one function compiled for this instruction set
// (flatten). Called once per work unit.
template <class F>
__attribute__((flatten)) void per_isa(const F& f) { f(); }

// eps, eps2 of W consecutive elements from logical index base (SPEC 4: one Philox call per pair
// q = e >> 1; an odd base starts in the middle of a pair); w: 4 (W / 2 + 1) words of scratch (the
// words of the row's pairs). The Philox words go through memory (one loop doing both runs out of
// vector registers and is slower).
int64_t draw_row_words(int64_t W) { return 4 * (W / 2 + 1); }

void draw_row(const PhiloxKey& key, uint64_t base, int64_t W, float* eps, float* eps2, uint32_t* w) {
  const int first = int(base & 1u);
  philox_row(key, base >> 1, (first + W + 1) / 2, w);
  box_muller_row(w, first, W, eps, eps2);
}

void draw_row(const PhiloxKey& key, uint64_t base, int64_t W, double* eps, double* eps2, uint32_t*) {
  // y: the row position of each pair's first element (-1 for an odd base)
  for (int64_t y = -int64_t(base & 1u); y < W; y += 2) {
    double e0, e1, f0, f1;
    normal_quad<double>(key, (base + uint64_t(y)) >> 1, e0, e1, f0, f1);
    if (y >= 0) eps[y] = e0, eps2[y] = f0;
    if (y + 1 < W) eps[y + 1] = e1, eps2[y + 1] = f1;
  }
}

template <int S, class T, class A>
struct RowNoise {
  const Params<A>& P;
  int n, R;
  int64_t W;
  std::vector<A> eps_ring, h_ring, e2row;
  std::vector<uint32_t> words;  // Philox output of one row's pairs

  RowNoise(const Params<A>& P_, int n_) : P(P_), n(n_), R(2 * n_), W(P_.W) {
    eps_ring.assign(size_t(R) * W, A(0));
    h_ring.assign(size_t(R) * W, A(0));
    e2row.assign(size_t(W), A(0));
    if (P.draw) words.assign(size_t(draw_row_words(W)), 0u);
  }

  // Draw or read logical row r (wrapped into [0, H)) into the rings.
  void gen_row(int64_t b, int64_t c, int64_t r) {
    const int64_t h = wrap(r, P.H);
    A* er = eps_ring.data() + wrap(r, R) * W;
    A* hr = h_ring.data() + wrap(r, R) * W;
    A* e2 = e2row.data();
    if (P.draw) {
      const NoiseStream ns = noise_stream(P, b, c);
      draw_row(ns.key, ns.base + uint64_t(h * W), W, er, e2, words.data());
    } else {
      if (P.has_eps)
        for (int64_t y = 0; y < W; ++y) er[y] = load_elem<A>(P.eps.template at<const T>(b, c, h, y));
      if (P.has_block)
        for (int64_t y = 0; y < W; ++y) e2[y] = load_elem<A>(P.eps2.template at<const T>(b, c, h, y));
    }
    if (!P.has_block) return;
    // hr[y] = sum_{j < s} e2[(y - j + shift) mod W]: one pass, wraparound only at the two ends.
    const int m = S ? S : n;
    const int64_t lo = std::min<int64_t>(W, std::max<int64_t>(0, m - 1 - P.shift));
    const int64_t hi = std::max<int64_t>(lo, W - P.shift);
    const A* e2s = e2 + P.shift;
    for (int64_t y = 0; y < lo; ++y) hr[y] = wrapped_sum(e2, y);
#pragma omp simd
    for (int64_t y = lo; y < hi; ++y) {
      A acc = 0;
      for (int j = 0; j < m; ++j) acc += e2s[y - j];
      hr[y] = acc;
    }
    for (int64_t y = hi; y < W; ++y) hr[y] = wrapped_sum(e2, y);
  }

  // The columns near the ends: y - j + shift lies in [-W, 2W) (W >= s), so the wraparound is one
  // compare instead of an integer division (with many small images these columns dominated).
  A wrapped_sum(const A* e2, int64_t y) const {
    A acc = 0;
    for (int j = 0; j < n; ++j) {
      const int64_t i = y - j + P.shift;
      acc += e2[i < 0 ? i + W : i >= W ? i - W : i];
    }
    return acc;
  }

  // Noise of logical row r into dst: k (eps + alpha/s * sum_{i < s} hsum[r - i + shift]).
  void combine(int64_t r, A* dst) const {
    const int m = S ? S : n;
    const A* er = eps_ring.data() + wrap(r, R) * W;
    const A k = P.k, ka = P.k * P.alpha / A(m);
    if (!P.has_block) {
#pragma omp simd
      for (int64_t y = 0; y < W; ++y) dst[y] = k * er[y];
      return;
    }
    const A* rows[S ? S : kMaxS];
    for (int i = 0; i < m; ++i) rows[i] = h_ring.data() + wrap(r - i + P.shift, R) * W;
    const A keps = P.has_eps ? k : A(0);
#pragma omp simd
    for (int64_t y = 0; y < W; ++y) {
      A acc = 0;
      for (int i = 0; i < m; ++i) acc += rows[i][y];
      dst[y] = keps * er[y] + ka * acc;
    }
  }
};

// ---- Fused SIMD blur of one patch row (patch_blur / relay_corrupt, s = 2, 4, 8) ----
// patch_blur(X) = keep * A X A + floor * X per s x s patch (keep = 1 - d_min, floor = d_min).
// The column pass (A X) mixes the s rows of a patch row: plain vertical FMAs over the width. The
// row pass (. A, A symmetric) mixes the s adjacent values of each patch inside a vector:
// out[qs + j] = sum_l A[j][l] t[qs + l], i.e. for each l one fixed permutation (lane qs + j reads
// lane qs + l) times a vector of coefficients (lane qs + j holds A[j][l]). Both passes are fused,
// so each input element is loaded once and each output stored once, straight from / to the
// tensor when its rows are contiguous. AVX-512: float 16 lanes, double 8 (intrinsics, BlurRows:
// about 10% faster than the vector-extension rows there, and half / double storage in registers).
// AVX2 (8 lanes) and the portable path (4 lanes, s = 2, 4): float math only, written with vector
// extensions (vector_rows.h, blur_rows). Otherwise (float64 below AVX-512, s = 8 on the portable
// path) the compiler-vectorised two-pass code of Strip runs.
#if defined(RELAYOPS_ISA_AVX512)
#define RELAYOPS_AVX512 __attribute__((target("avx512f")))

struct F32x16 {
  using E = float;
  using V = __m512;
  using I = __m512i;
  using M = __mmask16;
  static constexpr int L = 16;
  RELAYOPS_AVX512 static M mask(int64_t n) { return n >= L ? M(0xFFFF) : M((1u << n) - 1); }
  RELAYOPS_AVX512 static V load(const E* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  RELAYOPS_AVX512 static void store(E* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  RELAYOPS_AVX512 static V set1(E a) { return _mm512_set1_ps(a); }
  RELAYOPS_AVX512 static V lanes(const E* a) { return _mm512_loadu_ps(a); }
  RELAYOPS_AVX512 static I index(const int64_t* ix) {
    alignas(64) int32_t t[L];
    for (int i = 0; i < L; ++i) t[i] = int32_t(ix[i]);
    return _mm512_load_si512(t);
  }
  RELAYOPS_AVX512 static V perm(I ix, V v) { return _mm512_permutexvar_ps(ix, v); }
  // Lane g S + j <- lane g S + l for every group g: in-lane shuffles with immediates for s = 2, 4
  // (cheaper than the general permutation), which the unrolled loops resolve at compile time.
  template <int S>
  RELAYOPS_AVX512 static V spread(V v, I ix, int l) {
    if constexpr (S == 4) {
      switch (l) {
        case 0: return _mm512_permute_ps(v, 0x00);
        case 1: return _mm512_permute_ps(v, 0x55);
        case 2: return _mm512_permute_ps(v, 0xAA);
        default: return _mm512_permute_ps(v, 0xFF);
      }
    } else if constexpr (S == 2) {
      return l == 0 ? _mm512_permute_ps(v, 0xA0) : _mm512_permute_ps(v, 0xF5);
    } else {
      return perm(ix, v);
    }
  }
  RELAYOPS_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  RELAYOPS_AVX512 static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
};

struct F64x8 {
  using E = double;
  using V = __m512d;
  using I = __m512i;
  using M = __mmask8;
  static constexpr int L = 8;
  RELAYOPS_AVX512 static M mask(int64_t n) { return n >= L ? M(0xFF) : M((1u << n) - 1); }
  RELAYOPS_AVX512 static V load(const E* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  RELAYOPS_AVX512 static void store(E* p, V v, M m) { _mm512_mask_storeu_pd(p, m, v); }
  RELAYOPS_AVX512 static V set1(E a) { return _mm512_set1_pd(a); }
  RELAYOPS_AVX512 static V lanes(const E* a) { return _mm512_loadu_pd(a); }
  RELAYOPS_AVX512 static I index(const int64_t* ix) { return _mm512_loadu_si512(ix); }
  RELAYOPS_AVX512 static V perm(I ix, V v) { return _mm512_permutexvar_pd(ix, v); }
  template <int S>
  RELAYOPS_AVX512 static V spread(V v, I ix, int l) {
    if constexpr (S == 4) {
      switch (l) {
        case 0: return _mm512_permutex_pd(v, 0x00);
        case 1: return _mm512_permutex_pd(v, 0x55);
        case 2: return _mm512_permutex_pd(v, 0xAA);
        default: return _mm512_permutex_pd(v, 0xFF);
      }
    } else if constexpr (S == 2) {
      return l == 0 ? _mm512_permute_pd(v, 0x00) : _mm512_permute_pd(v, 0xFF);
    } else {
      return perm(ix, v);
    }
  }
  RELAYOPS_AVX512 static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  RELAYOPS_AVX512 static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
};

template <class A> struct Simd512;
template <> struct Simd512<float> { using type = F32x16; };
template <> struct Simd512<double> { using type = F64x8; };

// Full-vector loads / stores of L contiguous elements of storage type T, converted to / from the
// vector's element type with the same results as load_elem / store_elem (common.h): bfloat16
// rounds to nearest even, float16 uses the hardware conversion (also round to nearest even, with
// subnormals and overflow to inf) and both write NaN as the scalar code does.
template <class VT, class T>
struct Io {
  RELAYOPS_AVX512 static typename VT::V load(const T* p) { return VT::lanes(p); }
  RELAYOPS_AVX512 static void store(T* p, typename VT::V v) { VT::store(p, v, VT::mask(VT::L)); }
};

template <>
struct Io<F32x16, bfloat16_t> {
  RELAYOPS_AVX512 static __m512 load(const bfloat16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  RELAYOPS_AVX512 static void store(bfloat16_t* p, __m512 v) {
    const __m512i x = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);  // quiet NaN, sign kept
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(x, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
};

template <>
struct Io<F32x16, half_t> {
  RELAYOPS_AVX512 static __m512 load(const half_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  RELAYOPS_AVX512 static void store(half_t* p, __m512 v) {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    if (nan) {  // float_to_half writes every NaN as sign | 0x7e00
      const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
      const __m512i w = _mm512_mask_or_epi32(_mm512_cvtepu16_epi32(h), nan, sign, _mm512_set1_epi32(0x7e00));
      h = _mm512_cvtepi32_epi16(w);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
  }
};

// in[i], out[i]: the s rows (W elements, contiguous) of one patch row; nz: its noise rows (row
// stride W) or nullptr, added as scale * nz (relay_corrupt). Am: the blur's A.
//
// The kernel is bound by FP throughput (Zen 4 runs one 512-bit FMA per cycle), so keep is folded
// into the row-pass coefficients: the output is floor x + sum_l (keep A)[j][l] t[qs + l].
template <int S, class VT>
struct BlurRows {
  using E = typename VT::E;
  using V = typename VT::V;
  static constexpr int L = VT::L;
  static_assert(L % S == 0, "a vector holds whole patches");
  typename VT::I ix[S];  // row pass: lane i <- lane (i / S) S + l, for each l
  V rc[S];               // row pass: lane i holds keep A[i % S][l], for each l
  E ac[S][S];            // column pass: A (broadcast operands)
  V vfloor, vscale;

  RELAYOPS_AVX512 BlurRows(const E (*Am)[S], E keep, E floor, E scale) {
    for (int l = 0; l < S; ++l) {
      int64_t idx[L];
      alignas(64) E co[L];
      for (int i = 0; i < L; ++i) {
        idx[i] = i / S * S + l;
        co[i] = keep * Am[i % S][l];
      }
      ix[l] = VT::index(idx);
      rc[l] = VT::lanes(co);
    }
    for (int k = 0; k < S; ++k)
      for (int i = 0; i < S; ++i) ac[k][i] = Am[k][i];
    vfloor = VT::set1(floor);
    vscale = VT::set1(scale);
  }

  // Columns y .. y + L - 1 (Full) or the n < L columns left at the end of the rows, which go
  // through a zero-padded buffer converted element by element (W is a multiple of S, so they
  // hold whole patches).
  template <bool Full, class T>
  RELAYOPS_AVX512 __attribute__((always_inline)) inline void step(const T* const* in, T* const* out, int64_t W,
                                                                  const E* nz, int64_t y, int64_t n) const {
    const auto m = VT::mask(n);
    alignas(64) E buf[L];
    V x[S], t[S];
    for (int i = 0; i < S; ++i) {
      if constexpr (Full) {
        x[i] = Io<VT, T>::load(in[i] + y);
      } else {
        for (int j = 0; j < L; ++j) buf[j] = j < n ? load_elem<E>(in[i] + y + j) : E(0);
        x[i] = VT::lanes(buf);
      }
    }
    // column pass: t_k = sum_i A[k][i] x_i, vertical FMAs (same order as Strip::column_pass)
    for (int k = 0; k < S; ++k) {
      t[k] = VT::mul(VT::set1(ac[k][0]), x[0]);
      for (int i = 1; i < S; ++i) t[k] = VT::fma(VT::set1(ac[k][i]), x[i], t[k]);
    }
    for (int k = 0; k < S; ++k) {
      // row pass inside each patch: floor x + sum_l keep A[j][l] t[qS + l] (+ scale * noise)
      V r = VT::mul(vfloor, x[k]);
      if (nz) r = VT::fma(vscale, VT::load(nz + k * W + y, m), r);
      for (int l = 0; l < S; ++l) r = VT::fma(rc[l], VT::template spread<S>(t[k], ix[l], l), r);
      if constexpr (Full) {
        Io<VT, T>::store(out[k] + y, r);
      } else {
        VT::store(buf, r, m);
        for (int j = 0; j < n; ++j) store_elem<E>(out[k] + y + j, buf[j]);
      }
    }
  }
};

template <int S, class VT, class T>
RELAYOPS_AVX512 void blur_rows_avx512(const T* const* in, T* const* out, int64_t W,
                                      const typename VT::E (*Am)[S], typename VT::E keep, typename VT::E floor,
                                      const typename VT::E* nz, typename VT::E scale, int64_t ahead) {
  constexpr int L = VT::L;
  const BlurRows<S, VT> k(Am, keep, floor, scale);
  // local copies of the row pointers: the stores cannot alias them, so they stay in registers
  const T* ip[S];
  T* op[S];
  for (int i = 0; i < S; ++i) {
    ip[i] = in[i];
    op[i] = out[i];
  }
  int64_t y = 0;
  for (; y + L <= W; y += L) {
    for (int i = 0; i < S; ++i) __builtin_prefetch(ip[i] + y + ahead);  // the next patch row (vector_rows.h)
    k.template step<true>(ip, op, W, nz, y, L);
  }
  if (y < W) k.template step<false>(ip, op, W, nz, y, W - y);
}
#endif

template <int S, class T, class A>
struct Strip {
  const Params<A>& P;
  int64_t W;
  std::vector<A> X, X0, Xd, Tb, Vb;  // S rows of W each (Xd: x0b - x0, second-order relay_step)
  A R[S][S][S];  // R_k per row frequency k, for the current sample (relay_step)
  A Re[S][S][S];  // the same for the correction factor E (second-order relay_step)
  A Ab[S][S];     // blur's 1-D map C^T diag(e) C, for the current sample (patch_blur, relay_corrupt)
  A Cm[S][S], CmT[S][S];

  Strip(const Params<A>& P_) : P(P_), W(P_.W) {
    for (auto* v : {&X, &X0, &Tb, &Vb}) v->assign(size_t(S) * W, A(0));
    if (second_order(P)) Xd.assign(size_t(S) * W, A(0));
    for (int k = 0; k < S; ++k)
      for (int n = 0; n < S; ++n) CmT[n][k] = Cm[k][n] = P.dct[k * S + n];
  }

  // R_k[j'][j] = sum_l C[l][j'] F[k][l] C[l][j] for the sample's factors F (Re_k: E). For the blur, whose
  // D_ij = (1 - d_min) e_i e_j + d_min with e_i = exp(-pi^2 i^2 tau / s^2) is separable,
  // patch_blur(X) = (1 - d_min) A X A + d_min X with A = C^T diag(e) C: two passes, not three.
  void set_sample(const SampleConsts<S, A>& sc, int64_t b) {
    if (P.mode == kBlur || P.mode == kCorrupt) {
      A e[S];
      for (int l = 0; l < S; ++l) e[l] = exp(-A(9.869604401089358) * A(l * l) / A(S * S) * P.tau[b]);
      for (int a = 0; a < S; ++a)
        for (int c = 0; c < S; ++c) {
          A acc = 0;
          for (int l = 0; l < S; ++l) acc += Cm[l][a] * e[l] * Cm[l][c];
          Ab[a][c] = acc;
        }
    }
    row_matrices(sc.F, R);
    if (second_order(P)) row_matrices(sc.E, Re);
  }

  // M[k] = C^T diag(D[k S .. k S + S - 1]) C: the row pass of a per-frequency factor D, row k.
  void row_matrices(const A* D, A (*M)[S][S]) {
    for (int k = 0; k < S; ++k)
      for (int a = 0; a < S; ++a)
        for (int b = 0; b < S; ++b) {
          A acc = 0;
          for (int l = 0; l < S; ++l) acc += Cm[l][a] * D[k * S + l] * Cm[l][b];
          M[k][a][b] = acc;
        }
  }

  // Asks for the row S rows below `row` (the same row of the next patch row, where the plane has
  // one) while this one is read: the short row streams of a patch row are too short for the
  // hardware prefetcher (vector_rows.h blur_rows).
  void prefetch_next(const T* row, int64_t h0, int64_t sh) const {
    if (h0 + S >= P.H) return;
    for (int64_t y = 0; y < W; y += 64 / int64_t(sizeof(T))) __builtin_prefetch(row + S * sh + y);
  }

  // The S rows of view v's patch row at h0 as math-type values, returned as the first row with
  // the row stride in `stride`: the tensor's own rows where they are contiguous and of the math
  // type (read in place), else copies in `scratch` (stride W).
  const A* rows_in(const View& v, int64_t b, int64_t c, int64_t h0, A* scratch, int64_t& stride) const {
    if constexpr (std::is_same_v<T, A>) {
      if (v.sw == 1) {
        const A* first = v.template at<const A>(b, c, h0, 0);
        for (int i = 0; i < S; ++i) prefetch_next(first + i * v.sh, h0, v.sh);
        stride = v.sh;
        return first;
      }
    }
    load_rows(v, b, c, h0, scratch);
    stride = W;
    return scratch;
  }

  // Where the S output rows of the patch row at h0 go: the output's own rows where they are
  // contiguous and of the math type, else `scratch` (stride W; store_rows copies it out).
  A* rows_out(int64_t b, int64_t c, int64_t h0, A* scratch, int64_t& stride) const {
    if constexpr (std::is_same_v<T, A>) {
      if (P.out.sw == 1) {
        stride = P.out.sh;
        return P.out.template at<A>(b, c, h0, 0);
      }
    }
    stride = W;
    return scratch;
  }

  void load_rows(const View& v, int64_t b, int64_t c, int64_t h0, A* dst) const {
    for (int i = 0; i < S; ++i) {
      const T* src = v.template at<const T>(b, c, h0 + i, 0);
      A* d = dst + i * W;
      if (v.sw == 1) {
        prefetch_next(src, h0, v.sh);
#pragma omp simd
        for (int64_t y = 0; y < W; ++y) d[y] = load_elem<A>(src + y);
      } else {
        for (int64_t y = 0; y < W; ++y) d[y] = load_elem<A>(src + y * v.sw);
      }
    }
  }

  void store_rows(int64_t b, int64_t c, int64_t h0, const A* srcbuf) const {
    for (int i = 0; i < S; ++i) {
      T* dst = P.out.template at<T>(b, c, h0 + i, 0);
      const A* s = srcbuf + i * W;
      if (P.out.sw == 1) {
#pragma omp simd
        for (int64_t y = 0; y < W; ++y) store_elem<A>(dst + y, s[y]);
      } else {
        for (int64_t y = 0; y < W; ++y) store_elem<A>(dst + y * P.out.sw, s[y]);
      }
    }
  }

  // Heun (SPEC 8): dst <- heun_x0(x, x0, x', x0'), reading x' and x0' straight from memory in the
  // same loop; x and x0 rows `xs` and `x0s` apart, dst's W apart (dst may be x0 itself).
  void heun_rows(const SampleConsts<S, A>& sc, int64_t b, int64_t c, int64_t h0, const A* x, int64_t xs,
                 const A* x0, int64_t x0s, A* dst) const {
    const A sg = sc.sigma, sn = sc.sigma_next;
    for (int i = 0; i < S; ++i) {
      const T* xp = P.xp.template at<const T>(b, c, h0 + i, 0);
      const T* x0p = P.x0p.template at<const T>(b, c, h0 + i, 0);
      const int64_t sp = P.xp.sw, s0p = P.x0p.sw;
      const A *xr = x + i * xs, *x0r = x0 + i * x0s;
      A* d = dst + i * W;
      if (sp == 1 && s0p == 1) {
        prefetch_next(xp, h0, P.xp.sh);
        prefetch_next(x0p, h0, P.x0p.sh);
#pragma omp simd
        for (int64_t y = 0; y < W; ++y) {
          d[y] = heun_x0(xr[y], x0r[y], load_elem<A>(xp + y), load_elem<A>(x0p + y), sg, sn);
        }
      } else {
        for (int64_t y = 0; y < W; ++y) {
          d[y] = heun_x0(xr[y], x0r[y], load_elem<A>(xp + y * sp), load_elem<A>(x0p + y * s0p), sg, sn);
        }
      }
    }
  }

  // out[k][y] = sum_i M[k][i] in[i][y] (M = C, C^T or the blur's A; in's rows `stride` apart).
  void column_pass(const A* in, int64_t stride, A* out, const A (*M)[S]) const {
    for (int k = 0; k < S; ++k) {
      A m[S];
      for (int i = 0; i < S; ++i) m[i] = M[k][i];
      A* o = out + k * W;
#pragma omp simd
      for (int64_t y = 0; y < W; ++y) {
        A acc = 0;
        for (int i = 0; i < S; ++i) acc += m[i] * in[i * stride + y];
        o[y] = acc;
      }
    }
  }

  // The step's last column pass fused with its combine: out[k][y] = gamma x[k][y] +
  // sum_i C^T[k][i] v[i][y] (+ scale nz[k][y] when nz is given), rows of x and out `xs` and `os`
  // apart.
  void step_out(const A* v, const A* x, int64_t xs, A* out, int64_t os, A gamma, const A* nz, A scale) const {
    for (int k = 0; k < S; ++k) {
      A m[S];
      for (int i = 0; i < S; ++i) m[i] = CmT[k][i];
      const A* xk = x + k * xs;
      A* o = out + k * os;
      if (nz) {
        const A* nk = nz + k * W;
#pragma omp simd
        for (int64_t y = 0; y < W; ++y) {
          A acc = 0;
          for (int i = 0; i < S; ++i) acc += m[i] * v[i * W + y];
          o[y] = gamma * xk[y] + acc + scale * nk[y];
        }
      } else {
#pragma omp simd
        for (int64_t y = 0; y < W; ++y) {
          A acc = 0;
          for (int i = 0; i < S; ++i) acc += m[i] * v[i * W + y];
          o[y] = gamma * xk[y] + acc;
        }
      }
    }
  }

  // Per row k and patch q: out[q S + a] = sum_j M[a][j] in[q S + j] with M = R_k (which = 0),
  // C (1), C^T (2), the blur's A (3) or Re_k (4); out's rows `os` apart.
  void row_pass(const A* in, A* out, int64_t os, int which) const {
    const int64_t nq = W / S;
    for (int k = 0; k < S; ++k) {
      A M[S][S];
      for (int a = 0; a < S; ++a)
        for (int j = 0; j < S; ++j)
          M[a][j] = which == 0 ? R[k][a][j] : which == 1 ? Cm[a][j] : which == 2 ? Cm[j][a] : which == 3 ? Ab[a][j]
                                                                                             : Re[k][a][j];
      const A* src = in + k * W;
      A* dst = out + k * os;
#pragma omp simd
      for (int64_t q = 0; q < nq; ++q) {
        A v[S];
        for (int j = 0; j < S; ++j) v[j] = src[q * S + j];
        for (int a = 0; a < S; ++a) {
          A acc = 0;
          for (int j = 0; j < S; ++j) acc += M[a][j] * v[j];
          dst[q * S + a] = acc;
        }
      }
    }
  }

  // Fused blur of one patch row of float math with the vector-extension rows of one instruction
  // set (vector_rows.h blur_rows): float rows in place, other storage via the X / Vb scratch rows.
  template <class Rows>
  void blur_float_rows(Rows rows, int64_t b, int64_t c, int64_t h0, const float* nz, float scale, int64_t next_rows) {
    const float* in[S];
    float* out[S];
    bool direct = false;
    if constexpr (std::is_same_v<T, float>) direct = P.x.sw == 1 && P.out.sw == 1;
    for (int i = 0; i < S; ++i) {
      in[i] = X.data() + i * W;
      out[i] = Vb.data() + i * W;
      if constexpr (std::is_same_v<T, float>) {
        if (direct) {
          in[i] = P.x.template at<const float>(b, c, h0 + i, 0);
          out[i] = P.out.template at<float>(b, c, h0 + i, 0);
        }
      }
    }
    if (!direct) load_rows(P.x, b, c, h0, X.data());
    rows(in, out, W, Ab, 1.0f - P.d_min, P.d_min, nz, scale, direct ? next_rows : 0);
    if (!direct) store_rows(b, c, h0, Vb.data());
  }

  // Blur (+ noise) of the patch row at image row h0 with a fused kernel: the AVX-512 one, or for
  // float math the vector-extension rows of this instruction set (AVX2; the portable build's 4
  // lanes, NEON on aarch64, for s = 2, 4). False when none applies: Strip's two passes run.
  // Contiguous rows (any dtype on AVX-512) are read and written in place.
  bool blur_fused(int64_t b, int64_t c, int64_t h0, const A* nz, A scale) {
    [[maybe_unused]] const int64_t next_rows = h0 + S < P.H ? S * P.x.sh : 0;  // to the next patch row's input
#if !defined(RELAYOPS_ISA_AVX512)
    if constexpr (std::is_same_v<A, float> && kLanes % S == 0) {
      blur_float_rows(blur_rows<S>, b, c, h0, nz, scale, next_rows);
      return true;
    }
    return false;
#else
    // float64 with s = 8 holds one patch per vector: the row pass would be a shuffle per element,
    // slower than Strip's two passes.
    if (std::is_same_v<A, double> && S == 8) return false;
    using VT = typename Simd512<A>::type;
    const bool direct_in = P.x.sw == 1, direct_out = P.out.sw == 1;
    const T* in[S];
    T* out[S];
    const A* in_s[S];
    A* out_s[S];
    for (int i = 0; i < S; ++i) {
      in[i] = P.x.template at<const T>(b, c, h0 + i, 0);
      out[i] = P.out.template at<T>(b, c, h0 + i, 0);
      in_s[i] = X.data() + i * W;
      out_s[i] = Vb.data() + i * W;
    }
    const A keep = A(1) - P.d_min, floor = P.d_min;
    if (direct_in && direct_out) {
      blur_rows_avx512<S, VT, T>(in, out, W, Ab, keep, floor, nz, scale, next_rows);
      return true;
    }
    // strided rows (e.g. channels_last) go through the X / Vb scratch rows
    load_rows(P.x, b, c, h0, X.data());
    blur_rows_avx512<S, VT, A>(in_s, out_s, W, Ab, keep, floor, nz, scale, 0);
    store_rows(b, c, h0, Vb.data());
    return true;
#endif
  }

  // One patch row p of plane (b, c); nz: its noise rows (row stride W) when needed.
  void process(const SampleConsts<S, A>& sc, int64_t b, int64_t c, int64_t p, const A* nz) {
    const int64_t h0 = p * S, n = int64_t(S) * W;
    A* x = X.data();
    A* t = Tb.data();
    A* v = Vb.data();
    switch (P.mode) {
      case kDct:
      case kIdct: {
        int64_t xs, os;
        const A* xr = rows_in(P.x, b, c, h0, x, xs);
        column_pass(xr, xs, t, P.mode == kDct ? Cm : CmT);
        A* o = rows_out(b, c, h0, v, os);
        row_pass(t, o, os, P.mode == kDct ? 1 : 2);
        if (o == v) store_rows(b, c, h0, v);
        return;
      }
      case kNoise:
        return store_rows(b, c, h0, nz);
      case kBlur:
      case kCorrupt: {
        if (blur_fused(b, c, h0, P.mode == kCorrupt ? nz : nullptr, sc.noise_scale)) return;
        int64_t xs, os;
        const A* xr = rows_in(P.x, b, c, h0, x, xs);
        column_pass(xr, xs, t, Ab);
        row_pass(t, v, W, 3);
        A* o = rows_out(b, c, h0, t, os);
        const A keep = A(1) - P.d_min, floor = P.d_min, scale = sc.noise_scale;
        for (int i = 0; i < S; ++i) {
          const A *vi = v + i * W, *xi = xr + i * xs;
          A* oi = o + i * os;
          if (P.mode == kCorrupt) {
            const A* ni = nz + i * W;
#pragma omp simd
            for (int64_t y = 0; y < W; ++y) oi[y] = keep * vi[y] + floor * xi[y] + scale * ni[y];
          } else {
#pragma omp simd
            for (int64_t y = 0; y < W; ++y) oi[y] = keep * vi[y] + floor * xi[y];
          }
        }
        if (o == t) store_rows(b, c, h0, t);
        return;
      }
      case kStep: {
        int64_t xs, x0s, os;
        const A* xr = rows_in(P.x, b, c, h0, x, xs);
        const A* x0r = rows_in(P.x0, b, c, h0, X0.data(), x0s);
        if (P.xp.present()) {  // Heun: x0 <- heun_x0(x, x0, x', x0') in scratch
          heun_rows(sc, b, c, h0, xr, xs, x0r, x0s, X0.data());
          x0r = X0.data();
          x0s = W;
        }
        column_pass(x0r, x0s, t, Cm);
        row_pass(t, v, W, 0);
        if (second_order(P)) {  // v += rows of E (x0b - x0), transformed like x0 (patch.h second_order_coef)
          A* xd = Xd.data();
          int64_t bs;
          const A* x0b = rows_in(P.x0b, b, c, h0, xd, bs);
          for (int i = 0; i < S; ++i) {
            const A *x0i = x0r + i * x0s, *x0bi = x0b + i * bs;
            A* xdi = xd + i * W;
#pragma omp simd
            for (int64_t y = 0; y < W; ++y) xdi[y] = x0bi[y] - x0i[y];
          }
          column_pass(xd, W, t, Cm);
          row_pass(t, xd, W, 4);
#pragma omp simd
          for (int64_t e = 0; e < n; ++e) v[e] += xd[e];
        }
        A* o = rows_out(b, c, h0, t, os);
        step_out(v, xr, xs, o, os, sc.gamma, P.eta != A(0) ? nz : nullptr, sc.noise_scale);
        if (o == t) store_rows(b, c, h0, t);
        return;
      }
    }
  }
};

// The per-sample constants (sample_consts, Strip::set_sample) depend only on the sample's sigma,
// sigma_next, tau, tau_next (and correction factor). With many small images sharing one value (a scalar broadcast to
// [B]), recomputing their exps and the s^4 maps for every sample cost more than the pixels.
template <class A>
bool same_sample_params(const Params<A>& P, int64_t b, int64_t b0) {
  for (const A* v : {P.sigma, P.sigma_next, P.tau, P.tau_next})
    if (v && !(v[b] == v[b0])) return false;
  if (second_order(P))
    for (int e = 0; e < P.s * P.s; ++e)
      if (!(P.correction[b * P.s * P.s + e] == P.correction[b0 * P.s * P.s + e])) return false;
  return true;
}

template <int S, class T, class A>
void run(const Params<A>& P) {
  const int n = S ? S : P.s;
  const int64_t nstrips = P.H / n, nq = P.W / n, planes = P.B * P.C;
  const bool rows = needs_noise(P);
  const bool strips = S != 0;  // the row-vectorised path
  const bool noise_in_place = std::is_same_v<T, A> && P.mode == kNoise && P.out.sw == 1;
  int64_t chunk = 1;
  if (rows) {  // long runs of patch rows amortise the s - 1 halo rows each unit redraws
    const int64_t want = (planes * nstrips + 8 * num_threads() - 1) / (8 * num_threads());
    chunk = std::min<int64_t>(nstrips, std::max<int64_t>(4, want));
  }
  const int64_t nchunks = (nstrips + chunk - 1) / chunk, units = planes * nchunks;
  // One unit of work runs on the calling thread: waking the team would cost more than a small
  // call's whole kernel (and, on a loaded machine, wait for a worker to be scheduled).
#pragma omp parallel if (units > 1)
  {
    SampleConsts<S, A> sc;
    int64_t sc_b = -1;
    RowNoise<S, T, A>* rn = rows ? new RowNoise<S, T, A>(P, n) : nullptr;
    // Strip<S> exists for compile-time S only; run-time s (S == 0) always takes the per-patch path.
    using StripT = Strip<S ? S : 1, T, A>;
    StripT* st = nullptr;
    if constexpr (S != 0) st = strips ? new StripT(P) : nullptr;
    std::vector<A> nzrows(rows ? size_t(n) * P.W : 0);
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t b = u / (P.C * nchunks), c = (u / nchunks) % P.C, ch = u % nchunks;
      const int64_t p0 = ch * chunk, p1 = std::min(nstrips, p0 + chunk);
      if (b != sc_b) {
        if (sc_b < 0 || !same_sample_params(P, b, sc_b)) {
          sample_consts<S, A>(P, b, sc);
          if constexpr (S != 0)
            if (st) st->set_sample(sc, b);
        }
        sc_b = b;
      }
      per_isa([&] {  // the patch rows of this unit, compiled for the instruction set in use
        int64_t next = p0 * n - (n - 1) + P.shift;  // next noise row to draw (rows mode)
        for (int64_t p = p0; p < p1; ++p) {
          const A* nz = nullptr;
          if (rows) {
            for (; next <= p * n + n - 1 + P.shift; ++next) rn->gen_row(b, c, next);
            if (noise_in_place) {  // relay_noise into contiguous rows of its own type: no copy
              if constexpr (std::is_same_v<T, A>)
                for (int i = 0; i < n; ++i) rn->combine(p * n + i, P.out.template at<A>(b, c, p * n + i, 0));
              continue;
            }
            for (int i = 0; i < n; ++i) rn->combine(p * n + i, nzrows.data() + i * P.W);
            nz = nzrows.data();
          }
          if (st) {
            if constexpr (S != 0) st->process(sc, b, c, p, nz);
          } else {  // without noise, nzrows is empty and never read (a null constant here would make GCC
                    // warn about the noise reads of modes that never run without it)
            for (int64_t q = 0; q < nq; ++q)
              process_patch<S, T, A>(P, sc, b, c, p, q, nzrows.data() + (rows ? q * n : 0), rows ? P.W : 0);
          }
        }
      });
    }
    delete rn;
    delete st;
  }
}

template <class T, class A>
void run_sizes(const Params<A>& P, bool cuda_tiles) {
  if (cuda_tiles) {  // the CUDA kernels' tiles, emulated for the tests: built once, in the portable build
    if constexpr (kIsa != kPortable) throw std::logic_error("relayops: the tile emulation is in the portable build");
    else return with_tile_size(P.s, [&](auto S) { emulate_tiles<decltype(S)::value, T, A>(P); });
  }
  switch (P.s) {
    case 2: return run<2, T, A>(P);
    case 4: return run<4, T, A>(P);
    case 8: return run<8, T, A>(P);
    default: return run<0, T, A>(P);
  }
}

void launch(const CallArgs& a, bool cuda_tiles) {
  switch (a.dtype) {
    case kFloat32: return run_sizes<float, float>(make_params<float>(a), cuda_tiles);
    case kFloat64: return run_sizes<double, double>(make_params<double>(a), cuda_tiles);
    case kFloat16: return run_sizes<half_t, float>(make_params<float>(a), cuda_tiles);
    case kBFloat16: return run_sizes<bfloat16_t, float>(make_params<float>(a), cuda_tiles);
    default: throw std::invalid_argument("relayops: unknown dtype code");
  }
}

}  // namespace

extern const IsaKernels kernels = {launch, philox_row, box_muller_row, transcendental};

}  // namespace RELAYOPS_ISA
}  // namespace cpu
}  // namespace relayops
