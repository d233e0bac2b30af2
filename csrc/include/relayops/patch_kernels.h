// The specialised CUDA kernels (docs/design.md, "CUDA kernels: one kernel per op"): patch_dct,
// patch_idct, patch_blur, block_noise (and its adjoint), relay_noise, relay_corrupt and
// relay_step (Euler, Heun, second order), one kernel per op, patch size S and storage type T, no
// run-time mode branches. Each kernel's per-thread body is a
// __host__ __device__ function of its thread coordinates and a memory-access interface, so that
//   - csrc/cuda/kernels.cu wraps it in a thin __global__ kernel (GlobalMemory: plain loads and
//     stores of whole vectors), and
//   - csrc/cpu/cuda_emulation.cpp runs the same grid thread by thread (warp by warp for the
//     shuffles of block noise and the noise ops) on CPU memory, recording every warp's accesses
//     for the tests.
//
// Patch kernels: one thread per s x s patch, grid (patch columns, patch rows, planes). The thread
// loads its patch row by row as vectors of kPatchVec<S, T> elements (16 bytes for float32 at
// s = 4: a warp reads 32 consecutive patches of a row, 512 contiguous bytes per instruction),
// keeps it in registers, runs the separable transform with compile-time DCT coefficients and
// stores it the same way. A 64-bit plane base, 32-bit offsets inside the plane.
//
// Block noise (SPEC 3: out = k alpha / s * sum of the s x s box of g at (x - i, y - j), or at
// (x + i, y + j) for the adjoint, wrapping around the image): a thread owns a strip of
// kBoxVec<S, T, A> columns of a band of rows and walks down it; each input row's s - 1 halo
// columns come from the neighbouring lanes by warp shuffle (the lanes at the warp's edge, or at
// the image's right edge for the adjoint, load them, wrapping around the image); the horizontal
// s-sums of the last s rows stay in a ring of registers, and their sum is the output row.
//
// The noise ops' kernels (relay_warp, below) walk patch columns the same way, with the noise drawn
// row by row. choose_cuda_path says which inputs take these kernels; the rest keep the tile
// kernel (tile.h).
#pragma once
#include <cstdint>
#include <type_traits>
#include <utility>

#include "patch.h"

#if defined(__CUDACC__)
#define RELAYOPS_HDC __host__ __device__ constexpr
#else
#define RELAYOPS_HDC constexpr
#endif

#if defined(__CUDA_ARCH__)
#define RELAYOPS_UNROLL _Pragma("unroll")
#else
#define RELAYOPS_UNROLL
#endif

namespace relayops {

// Patch sizes with a specialised kernel; other s take the tile kernel.
constexpr int kFastMinS = 2, kFastMaxS = 8;

// Threads per block of the specialised kernels.
constexpr int kFastThreads = 128;

// Accumulation type of storage type T.
template <class T>
using acc_t = std::conditional_t<std::is_same<T, double>::value, double, float>;

// f(integral_constant<int, I>) for I = Begin .. End - 1, unrolled at compile time: the ring slots
// and DCT coefficients then are compile-time indices (registers and immediates, no local memory).
template <int Begin, int End, class F>
RELAYOPS_HD void static_for(F&& f) {
  if constexpr (Begin < End) {
    f(std::integral_constant<int, Begin>{});
    static_for<Begin + 1, End>(f);
  }
}

// ---- Compile-time DCT-II matrix (SPEC 1): C[k][n] = c_k cos(pi (2n + 1) k / (2s)) ----

// cos(pi m / (2 s)) for integers m >= 0, s >= 1: m reduced exactly to [0, s] (a quarter period),
// then the Taylor series, which converges to double precision on [0, pi / 2] in 13 terms.
RELAYOPS_HDC double cos_pi_fraction(int m, int s) {
  m %= 4 * s;                  // period 2 pi
  if (m > 2 * s) m = 4 * s - m;  // cos(2 pi - x) = cos x
  double sign = 1;
  if (m > s) {  // cos(pi - x) = -cos x
    m = 2 * s - m;
    sign = -1;
  }
  const double x = 3.14159265358979323846 * m / (2.0 * s), x2 = x * x;
  double term = 1, sum = 1;
  for (int i = 1; i < 15; ++i) {
    term *= -x2 / ((2 * i - 1) * (2 * i));
    sum += term;
  }
  return sign * sum;
}

// sqrt(v) for v > 0 by Newton's iteration (converged to double precision well before 64 steps).
RELAYOPS_HDC double sqrt_newton(double v) {
  double r = v < 1 ? 1 : v;
  for (int i = 0; i < 64; ++i) r = 0.5 * (r + v / r);
  return r;
}

template <int S>
struct DctMatrix {
  double c[S][S];
};

template <int S>
RELAYOPS_HDC DctMatrix<S> dct_matrix() {
  DctMatrix<S> m{};
  for (int k = 0; k < S; ++k)
    for (int n = 0; n < S; ++n)
      m.c[k][n] = sqrt_newton((k == 0 ? 1.0 : 2.0) / S) * cos_pi_fraction((2 * n + 1) * k, S);
  return m;
}

// ---- Vector widths ----

// Elements per vector access of a run of n elements of T: the largest power of two dividing n
// whose bytes are at most 16 (e.g. 4 float32 at n = 4 or 8, 1 at n = 3).
template <class T>
RELAYOPS_HDC int vec_elems(int n) {
  int v = 1;
  while (n % (2 * v) == 0 && 2 * v * int(sizeof(T)) <= 16) v *= 2;
  return v;
}

// Patch kernels: a patch row of S elements in vectors of this many.
template <int S, class T>
constexpr int kPatchVec = vec_elems<T>(S);

// Block noise: columns per thread; at most 32 float (16 double) accumulators in the ring (S x V of
// them; more spill), so s = 8 at float16 reads 4 columns (8 bytes) instead of 8.
template <class T, class A>
RELAYOPS_HDC int box_vec(int s) {
  int v = vec_elems<T>(s);
  while (v > 1 && s * v > (sizeof(A) == 8 ? 16 : 32)) v /= 2;
  return v;
}

template <int S, class T, class A>
constexpr int kBoxVec = box_vec<T, A>(S);

// Whether block noise has a specialised kernel at patch size s: float64 stops at s = 6 (at 7 and 8
// its single-column strips need more registers than ptxas gives them without spilling).
template <class A>
RELAYOPS_HDC bool box_kernel_exists(int s) {
  return s >= 2 && s <= (sizeof(A) == 8 ? 6 : 8);
}

// N consecutive elements of T, aligned to their size (a power of two up to 16 bytes).
template <class T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Value conversions between storage T and accumulation A (the pointer forms are in common.h).
template <class A, class T>
RELAYOPS_HD A to_acc(const T& v) {
  return load_elem<A>(&v);
}

template <class T, class A>
RELAYOPS_HD T from_acc(A a) {
  T t;
  store_elem<A>(&t, a);
  return t;
}

#if defined(__CUDACC__)
// Device memory: each access one instruction of the vector's width (LDG/STG .E.128 for 16 bytes).
// Loads go through the read-only path: the kernels never read what they write.
template <int Bytes> struct Word;
template <> struct Word<2> { using type = unsigned short; };
template <> struct Word<4> { using type = unsigned int; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };

struct GlobalMemory {
  template <class V>
  __device__ __forceinline__ V load(const V* p) const {
    using W = typename Word<sizeof(V)>::type;
    const W w = __ldg(reinterpret_cast<const W*>(p));
    V v;
    memcpy(&v, &w, sizeof(V));
    return v;
  }
  template <class V>
  __device__ __forceinline__ void store(V* p, const V& v) const {
    using W = typename Word<sizeof(V)>::type;
    W w;
    memcpy(&w, &v, sizeof(V));
    *reinterpret_cast<W*>(p) = w;
  }
};
#endif

// Launch shape: 2-D blocks (x a multiple of 32, so a warp is 32 consecutive x of one y) and a
// 3-D grid.
struct Dim3 {
  int x, y, z;
};
struct LaunchShape {
  Dim3 grid, block;
};

// Blocks of kFastThreads threads over an nx x ny x nz grid of threads: as many x as there are
// (rounded up to a warp, at most the block), the rest of the block along y.
inline LaunchShape fast_launch_shape(int64_t nx, int64_t ny, int64_t nz) {
  const int bx = int(nx >= kFastThreads ? kFastThreads : (nx + 31) / 32 * 32);
  const int by = kFastThreads / bx;
  return {{int((nx + bx - 1) / bx), int((ny + by - 1) / by), int(nz)}, {bx, by, 1}};
}

// ---- Patch kernels: patch_dct, patch_idct, patch_blur ----

enum class PatchOp { kDct, kIdct, kBlur };

template <class T, class A>
struct PatchArgs {
  const T* x;  // input, element (b, c, h, w) at x[b sn + c sc + h sh + w]
  T* out;      // output, same form
  int64_t x_sn, x_sc, o_sn, o_sc;
  int32_t x_sh, o_sh;
  int32_t C, npc, npr;  // channels, patches per row and per column
  const A* tau;         // [B] (patch_blur)
  A d_min;
};

// y = M x for one row or column of a patch, M = C (forward) or C^T (Inverse), by the even/odd
// symmetry of the DCT-II, C[k][s - 1 - n] = (-1)^k C[k][n] (and C[k][(s - 1) / 2] = 0 for odd k
// and odd s): the forward folds x into sums and differences first, the inverse splits y into
// its even and odd parts last, about half the multiplies of the matrix product. The
// coefficients are compile-time constants (immediates).
template <int S, bool Inverse, class A>
RELAYOPS_HD void dct_1d(const A (&x)[S], A (&y)[S]) {
  constexpr DctMatrix<S> C = dct_matrix<S>();
  constexpr int H = S / 2;
  if constexpr (!Inverse) {
    A sum[H], dif[H];
    RELAYOPS_UNROLL
    for (int n = 0; n < H; ++n) {
      sum[n] = x[n] + x[S - 1 - n];
      dif[n] = x[n] - x[S - 1 - n];
    }
    RELAYOPS_UNROLL
    for (int k = 0; k < S; ++k) {
      const A* half = k % 2 ? dif : sum;
      A acc = A(C.c[k][0]) * half[0];
      RELAYOPS_UNROLL
      for (int n = 1; n < H; ++n) acc += A(C.c[k][n]) * half[n];
      if (S % 2 && k % 2 == 0) acc += A(C.c[k][H]) * x[H];
      y[k] = acc;
    }
  } else {
    RELAYOPS_UNROLL
    for (int n = 0; n < H; ++n) {
      A even = A(C.c[0][n]) * x[0], odd = A(C.c[1][n]) * x[1];
      RELAYOPS_UNROLL
      for (int k = 2; k < S; ++k) {
        if (k % 2)
          odd += A(C.c[k][n]) * x[k];
        else
          even += A(C.c[k][n]) * x[k];
      }
      y[n] = even + odd;
      y[S - 1 - n] = even - odd;
    }
    if constexpr (S % 2) {
      A acc = A(C.c[0][H]) * x[0];
      RELAYOPS_UNROLL
      for (int k = 2; k < S; k += 2) acc += A(C.c[k][H]) * x[k];
      y[H] = acc;
    }
  }
}

// X <- M X M^T in place (Inverse = false: U = C X C^T; true: X = C^T U C): each row, then each
// column, through dct_1d.
template <int S, bool Inverse, class A>
RELAYOPS_HD void transform_patch(A (&X)[S][S]) {
  RELAYOPS_UNROLL
  for (int i = 0; i < S; ++i) {
    A t[S];
    dct_1d<S, Inverse>(X[i], t);
    RELAYOPS_UNROLL
    for (int l = 0; l < S; ++l) X[i][l] = t[l];
  }
  RELAYOPS_UNROLL
  for (int l = 0; l < S; ++l) {
    A col[S], t[S];
    RELAYOPS_UNROLL
    for (int k = 0; k < S; ++k) col[k] = X[k][l];
    dct_1d<S, Inverse>(col, t);
    RELAYOPS_UNROLL
    for (int k = 0; k < S; ++k) X[k][l] = t[k];
  }
}

// The blur response D_kl(tau) = (1 - d_min) exp(-lambda_kl tau) + d_min (SPEC 2) multiplied into
// the coefficients. lambda_kl = pi^2 (k^2 + l^2) / s^2 separates, exp(-lambda_kl tau) = e_k e_l
// with e_k = exp(-pi^2 k^2 tau / s^2): s exponentials per patch instead of s^2.
template <int S, class A>
RELAYOPS_HD void apply_blur_response(A (&X)[S][S], A tau, A d_min) {
  A e[S];
  RELAYOPS_UNROLL
  for (int k = 0; k < S; ++k) e[k] = exp(-A(9.869604401089358 * k * k / (S * S)) * tau);
  const A keep = A(1) - d_min;
  RELAYOPS_UNROLL
  for (int k = 0; k < S; ++k) {
    const A ek = keep * e[k];
    RELAYOPS_UNROLL
    for (int l = 0; l < S; ++l) X[k][l] *= ek * e[l] + d_min;
  }
}

// The S elements of a patch row at src as A, in vectors of kPatchVec<S, T>; zeros where !active
// (nothing is read then).
template <int S, class T, class A, class Mem>
RELAYOPS_HD void load_row(const Mem& mem, const T* src, bool active, A (&r)[S]) {
  constexpr int N = kPatchVec<S, T>;
  using V = Vec<T, N>;
  RELAYOPS_UNROLL
  for (int j = 0; j < S; j += N) {
    V v{};
    if (active) v = mem.load(reinterpret_cast<const V*>(src + j));
    RELAYOPS_UNROLL
    for (int e = 0; e < N; ++e) r[j + e] = to_acc<A>(v.v[e]);
  }
}

template <int S, class T, class A, class Mem>
RELAYOPS_HD void store_row(const Mem& mem, T* dst, const A (&r)[S]) {
  constexpr int N = kPatchVec<S, T>;
  using V = Vec<T, N>;
  RELAYOPS_UNROLL
  for (int j = 0; j < S; j += N) {
    V v;
    RELAYOPS_UNROLL
    for (int e = 0; e < N; ++e) v.v[e] = from_acc<T>(r[j + e]);
    mem.store(reinterpret_cast<V*>(dst + j), v);
  }
}

// A patch whose top-left element is at src, rows sh elements apart.
template <int S, class T, class A, class Mem>
RELAYOPS_HD void load_patch_rows(const Mem& mem, const T* src, int32_t sh, bool active, A (&X)[S][S]) {
  RELAYOPS_UNROLL
  for (int i = 0; i < S; ++i) load_row<S>(mem, src + i * sh, active, X[i]);
}

// One thread's patch (pc, pr) of plane `plane`; threads past the patch grid return at once.
template <PatchOp Op, int S, class T, class A, class Mem>
RELAYOPS_HD void patch_thread(const Mem& mem, const PatchArgs<T, A>& a, int pc, int pr, int plane) {
  if (pc >= a.npc || pr >= a.npr) return;
  const int b = plane / a.C, c = plane - b * a.C;
  const T* src = a.x + (int64_t(b) * a.x_sn + int64_t(c) * a.x_sc) + (pr * S * a.x_sh + pc * S);
  T* dst = a.out + (int64_t(b) * a.o_sn + int64_t(c) * a.o_sc) + (pr * S * a.o_sh + pc * S);
  A X[S][S];
  load_patch_rows<S>(mem, src, a.x_sh, true, X);
  if constexpr (Op == PatchOp::kDct) {
    transform_patch<S, false>(X);
  } else if constexpr (Op == PatchOp::kIdct) {
    transform_patch<S, true>(X);
  } else {  // patch_idct(D(tau) patch_dct(x)) (SPEC 2)
    transform_patch<S, false>(X);
    apply_blur_response<S>(X, a.tau[b], a.d_min);
    transform_patch<S, true>(X);
  }
  RELAYOPS_UNROLL
  for (int i = 0; i < S; ++i) store_row<S>(mem, dst + i * a.o_sh, X[i]);
}

// ---- Block noise ----

template <class T, class A>
struct BoxArgs {
  const T* g;  // input, element (b, c, h, w) at g[b sn + c sc + h sh + w]
  T* out;
  int64_t g_sn, g_sc, o_sn, o_sc;
  int32_t g_sh, o_sh;
  int32_t C, H, W;
  int32_t nstrips;    // column strips per row: W / kBoxVec
  int32_t band_rows;  // rows per thread (a multiple of s; the last band may be shorter)
  int32_t nbands;
  A scale;  // k alpha / s
};

// Rows per band: about 32, a multiple of s (the thread redraws s - 1 rows above or below it).
inline int box_band_rows(int s, int64_t H) {
  const int rows = s * (32 / s > 0 ? 32 / s : 1);
  return int(rows < H ? rows : H);
}

// One lane of a block-noise strip: its columns, the current row, its halo and the ring.
template <int S, int V, class T, class A>
struct BoxLane {
  static constexpr int D = (S - 1 + V - 1) / V;  // neighbouring strips the halo reaches
  int q;                                          // strip index: columns q V .. q V + V - 1
  bool active;
  bool edge[D];  // the strip d + 1 away is not in this warp: load it instead of the shuffle
  int ncol[D];   // its first column, wrapped around the image
  A cur[V];
  A halo[S - 1];
  A ring[S][V];  // horizontal s-sums of the last s input rows, input row k in slot k mod s
};

// A whole warp's strips of one band: Warp supplies the lanes (one per thread on the device, all
// 32 in the emulation), their strip indices, the shuffles and the memory interface. Input row k
// (k = 0 .. rows + s - 2) is image row r0 - off + k (mod H), off = s - 1 for block_noise (sums
// over x - i) and 0 for the adjoint (x + i); after input row k >= s - 1 the ring holds the
// s rows of output row r0 + k - (s - 1).
template <int S, bool Adjoint, class T, class A, class Warp>
RELAYOPS_HD void block_noise_warp(const BoxArgs<T, A>& a, Warp& w) {
  constexpr int V = kBoxVec<S, T, A>, L = Warp::kLanes, off = Adjoint ? 0 : S - 1;
  using Lane = BoxLane<S, V, T, A>;
  using Vt = Vec<T, V>;
  const int band = w.band(), plane = w.plane();
  // No early exit, so that ptxas sees every lane reach every shuffle: a warp past the last band or
  // strip walks no rows (and loads nothing in the prologue).
  const bool idle = band >= a.nbands || w.strip(0) - w.lane(0) >= a.nstrips;
  const int r0 = idle ? 0 : band * a.band_rows;
  const int rows = idle ? 0 : a.H - r0 < a.band_rows ? a.H - r0 : a.band_rows;
  const int b = plane / a.C, c = plane - b * a.C;
  const T* src = a.g + (int64_t(b) * a.g_sn + int64_t(c) * a.g_sc);
  T* dst = a.out + (int64_t(b) * a.o_sn + int64_t(c) * a.o_sc);
  Lane t[L];
  for (int l = 0; l < L; ++l) {
    t[l].q = w.strip(l);
    t[l].active = !idle && t[l].q < a.nstrips;
    RELAYOPS_UNROLL
    for (int d = 1; d <= Lane::D; ++d) {
      int qn = Adjoint ? t[l].q + d : t[l].q - d;
      t[l].edge[d - 1] = Adjoint ? (w.lane(l) + d > 31 || qn >= a.nstrips) : w.lane(l) < d;
      qn = qn < 0 ? qn + a.nstrips : qn >= a.nstrips ? qn - a.nstrips : qn;  // d V <= s - 1 + V - 1 < W + V
      t[l].ncol[d - 1] = qn * V;
    }
  }
  // Input row k into ring slot Slot: own columns, halo, horizontal sums.
  const auto input_row = [&](int k, auto slot) {
    constexpr int Slot = decltype(slot)::value;
    int h = r0 - off + k;  // at most s - 1 rows past an edge, and s <= H
    h = h < 0 ? h + a.H : h >= a.H ? h - a.H : h;
    const T* row = src + h * a.g_sh;
    w.sync();
    for (int l = 0; l < L; ++l) {
      Vt v{};
      if (t[l].active) v = w.mem(l).load(reinterpret_cast<const Vt*>(row + t[l].q * V));
      RELAYOPS_UNROLL
      for (int e = 0; e < V; ++e) t[l].cur[e] = to_acc<A>(v.v[e]);
    }
    // Halo column j (0 .. s - 2): column q V - 1 - j (block_noise) or q V + V + j (adjoint), held
    // by the lane d = 1 + j / V away as element e; the lanes at the warp's (or image's) edge load
    // that strip's vector themselves, wrapping around the image.
    static_for<1, Lane::D + 1>([&](auto dc) {
      constexpr int d = decltype(dc)::value;
      A nb[L][V];  // the loaded strip, converted at once (no 16-bit values live across the shuffles)
      w.sync();
      for (int l = 0; l < L; ++l) {
        Vt v{};
        if (t[l].active && t[l].edge[d - 1]) v = w.mem(l).load(reinterpret_cast<const Vt*>(row + t[l].ncol[d - 1]));
        RELAYOPS_UNROLL
        for (int e = 0; e < V; ++e) nb[l][e] = to_acc<A>(v.v[e]);
      }
      static_for<(d - 1) * V, (d * V < S - 1 ? d * V : S - 1)>([&](auto jc) {
        constexpr int j = decltype(jc)::value, e = Adjoint ? j % V : V - 1 - j % V;
        A vals[L];
        for (int l = 0; l < L; ++l) vals[l] = t[l].cur[e];
        for (int l = 0; l < L; ++l) {
          const A v = Adjoint ? w.shfl_down(vals, l, d) : w.shfl_up(vals, l, d);
          t[l].halo[j] = t[l].edge[d - 1] ? nb[l][e] : v;
        }
      });
    });
    // Horizontal sums: the row as ext[0 .. V + s - 2] in column order, sum of ext[e .. e + s - 1].
    for (int l = 0; l < L; ++l) {
      const auto ext = [&](int i) {
        if constexpr (Adjoint) return i < V ? t[l].cur[i] : t[l].halo[i - V];
        else return i < S - 1 ? t[l].halo[S - 2 - i] : t[l].cur[i - (S - 1)];
      };
      RELAYOPS_UNROLL
      for (int e = 0; e < V; ++e) {
        A acc = ext(e);
        RELAYOPS_UNROLL
        for (int i = 1; i < S; ++i) acc += ext(e + i);
        t[l].ring[Slot][e] = acc;
      }
    }
  };
  static_for<0, S - 1>([&](auto k) { input_row(decltype(k)::value, k); });
  for (int r = 0; r < rows; r += S) {
    static_for<0, S>([&](auto ic) {
      constexpr int i = decltype(ic)::value;
      input_row(S - 1 + r + i, std::integral_constant<int, (S - 1 + i) % S>{});
      T* row = dst + (r0 + r + i) * a.o_sh;
      w.sync();
      for (int l = 0; l < L; ++l) {
        if (!t[l].active) continue;
        Vt v;
        RELAYOPS_UNROLL
        for (int e = 0; e < V; ++e) {
          A acc = t[l].ring[0][e];
          RELAYOPS_UNROLL
          for (int k = 1; k < S; ++k) acc += t[l].ring[k][e];
          v.v[e] = from_acc<T>(a.scale * acc);
        }
        w.mem(l).store(reinterpret_cast<Vt*>(row + t[l].q * V), v);
      }
    });
  }
}

#if defined(__CUDACC__)
// The device's view of a warp: this thread is its only lane.
struct DeviceWarp {
  static constexpr int kLanes = 1;
  int q, band_, plane_;
  __device__ int strip(int) const { return q; }
  __device__ int lane(int) const { return int(threadIdx.x) & 31; }
  __device__ int band() const { return band_; }
  __device__ int plane() const { return plane_; }
  __device__ void sync() const {}
  __device__ GlobalMemory mem(int) const { return {}; }
  template <class A>
  __device__ A shfl_up(const A (&v)[1], int, int d) const { return __shfl_up_sync(0xffffffffu, v[0], d); }
  template <class A>
  __device__ A shfl_down(const A (&v)[1], int, int d) const { return __shfl_down_sync(0xffffffffu, v[0], d); }
};
#endif

// ---- The noise ops: relay_noise, relay_corrupt, relay_step ----
//
// One thread per patch column of a band of patch rows, walking down it; grid (warps of patch
// columns, bands, planes). Per patch row the thread computes the transform term of its patch in
// registers as the patch kernels do (relay_corrupt: y = patch_idct(D(tau) patch_dct(x));
// relay_step: patch_idct(F patch_dct(x0)), F = D' - gamma D, with Heun's x0_eff or the second
// order's E patch_dct(x0_b - x0) added to the coefficients; SPEC 6, 8, 8.1), then walks the
// patch's s image rows: each row's eps and eps2 (drawn, s / 2 Philox calls of SPEC 4 through
// normal_quad, or loaded), the horizontal s-sums of eps2 (this lane's columns plus the suffix
// sums of the patch to the left, one shuffle per halo column), a ring of the last s rows'
// horizontal sums whose sum is the box sum of block noise (SPEC 3), and the output row
// `[gamma x] + [y] + scale k (eps + alpha / s box)`, stored at once.
//
// Each normal is drawn once per band, plus the s - 1 image rows above a band (the box sums'
// halo, drawn again by the band below them) and the patch column of each warp's lane 0, which
// only supplies the suffix sums of the column left of lane 1's (warps overlap by one patch
// column, wrapping around the image): 31 of 32 lanes write.

enum class RelayOp { kNoise, kCorrupt, kEuler, kHeun, kSecond };

// Where a call's noise comes from: none (relay_step with eta = 0), drawn, or given tensors.
enum NoiseSource : int { kNoNoise = 0, kDrawnNoise = 1, kGivenNoise = 2 };

// An image operand (P: const T or T): element (b, c, h, w) at ptr[b sn + c sc + h sh + w].
template <class P>
struct ImageArg {
  P* ptr;
  int64_t sn, sc;
  int32_t sh;
  RELAYOPS_HD P* plane(int b, int c) const { return ptr + (int64_t(b) * sn + int64_t(c) * sc); }
};

template <class T, class A>
struct RelayArgs {
  using acc = A;  // the per-sample helpers of patch.h read the fields named as in Params
  ImageArg<const T> x, x0, xp, x0p, x0b, eps, eps2;  // x: relay_corrupt's y; eps, eps2: given noise
  ImageArg<T> out;
  int mode, s;
  int64_t C, H, W;
  int32_t npc, npr;    // patches per row and per column
  int32_t band_rows;   // patch rows per band
  int32_t nbands;
  const A *sigma, *sigma_next, *tau, *tau_next, *correction;
  A eta, d_min, alpha, k;
  PhiloxKey key;
  const int64_t* seeds;
  int source;     // NoiseSource
  int has_block;  // the alpha block_noise(eps2) term is present
};

// Lanes of a warp that write: lane 0 supplies the halo of lane 1.
constexpr int kRelayLanes = 31;

// Warps a launch should have at least (about 16 per multiprocessor of an H100) before its bands
// are made longer.
constexpr int64_t kRelayMinWarps = 2048;

// Patch rows per band: 64 image rows (s - 1 halo rows drawn again above a band: 4.7% more draws
// at s = 4), halved down to 16 image rows while the launch (planes x bands x warps of a row) has
// fewer than kRelayMinWarps warps, so that small images still spread over the GPU.
inline int relay_band_rows(int s, int64_t npc, int64_t npr, int64_t planes) {
  const int64_t row_warps = planes * ((npc + kRelayLanes - 1) / kRelayLanes);
  int rows = 64 / s;
  const int shortest = 16 / s > 0 ? 16 / s : 1;
  while (rows / 2 >= shortest && row_warps * ((npr + rows - 1) / rows) < kRelayMinWarps) rows /= 2;
  return int(rows < npr ? rows : npr);
}

// Whether op has a kernel at patch size s with accumulation type A: even s, so that a patch row is
// s / 2 whole pairs of SPEC 4 (rows and planes start at even element indices since W is even),
// up to the largest s whose kernel ptxas compiles without spilling (sm_90): the transform term
// and the box-sum ring hold 2 s^2 values besides the draws, and Heun's x0_eff reads four images.
template <class A>
RELAYOPS_HDC bool relay_kernel_exists(RelayOp op, int s) {
  const bool dbl = sizeof(A) == 8;
  const int largest = op == RelayOp::kNoise ? (dbl ? 6 : 8)
                      : op == RelayOp::kCorrupt || op == RelayOp::kEuler ? (dbl ? 4 : 6)
                      : (dbl ? 2 : 4);
  return s % 2 == 0 && s >= 2 && s <= largest;
}

template <int S, class A>
struct RelayLane {
  int q;         // patch column, wrapped into the image
  bool reads;    // the column exists (a given eps2 is read for the halo)
  bool writes;   // ... and the lane is not its warp's supplier: images read, output written
  A y[S][S];     // the transform term of the current patch
  A ring[S][S];  // horizontal s-sums of eps2 of the last s image rows, row k in slot k mod s
  A eps[S], g[S];  // the current row's eps and eps2
  A tail[S - 1];   // tail[j] = g[j + 1] + ... + g[S - 1]: what the lane to the right adds
};

// A whole warp's patch columns of one band (Warp as for block_noise_warp). No early exit, so that
// ptxas sees every lane reach every shuffle: an idle warp walks no rows.
template <RelayOp Op, int S, class T, class A, class Warp>
RELAYOPS_HD void relay_warp(const RelayArgs<T, A>& a, Warp& w) {
  constexpr int L = Warp::kLanes;
  constexpr bool kStep = Op == RelayOp::kEuler || Op == RelayOp::kHeun || Op == RelayOp::kSecond;
  using Lane = RelayLane<S, A>;
  const int band = w.band(), plane = w.plane();
  const int q_first = (w.strip(0) - w.lane(0)) / 32 * kRelayLanes;  // the warp's first written column
  const bool idle = band >= a.nbands || q_first >= a.npc;
  const int p0 = idle ? 0 : band * a.band_rows;
  const int rows = idle ? 0 : a.npr - p0 < a.band_rows ? a.npr - p0 : a.band_rows;
  const int b = plane / int(a.C), c = plane - b * int(a.C);
  const int32_t W = int32_t(a.W), H = int32_t(a.H);

  // Per-sample constants: the coefficient factors F (halved for Heun, whose transform input is
  // 2 x0_eff) and E, the noise's factors, the Heun ratio sigma / sigma'.
  const SampleScalars<A> ss = sample_scalars(a, b);
  A F[S][S], E[S][S];
  RELAYOPS_UNROLL
  for (int i = 0; i < S; ++i)
    RELAYOPS_UNROLL
    for (int j = 0; j < S; ++j) {
      if constexpr (Op != RelayOp::kNoise) F[i][j] = coef_factor(a, ss, b, i, j) * A(Op == RelayOp::kHeun ? 0.5 : 1.0);
      if constexpr (Op == RelayOp::kSecond) E[i][j] = correction_factor(a, b, i, j);
    }
  A ratio = A(0);
  if constexpr (Op == RelayOp::kHeun) ratio = ss.sigma / ss.sigma_next;
  const bool noisy = a.source != kNoNoise, given = a.source == kGivenNoise;
  const A c_eps = ss.noise_scale * a.k, c_box = a.has_block ? c_eps * (a.alpha / A(S)) : A(0);
  const NoiseStream ns = noise_stream(a, b, c);
  const T* pe = given ? a.eps.plane(b, c) : nullptr;
  const T* pg = given && a.has_block ? a.eps2.plane(b, c) : pe;  // pe: a valid pointer never read
  T* po = a.out.plane(b, c);

  Lane t[L];
  for (int l = 0; l < L; ++l) {
    const int q = q_first - 1 + w.lane(l);
    t[l].writes = !idle && w.lane(l) > 0 && q < a.npc;
    t[l].reads = !idle && q < a.npc;
    t[l].q = q < 0 ? q + a.npc : q;
  }

  // Image row h of eps2 into ring slot Slot (and its eps, for an output row).
  const auto input_row = [&](int32_t h, auto slot, bool output_row) {
    constexpr int Slot = decltype(slot)::value;
    if (!given) {
      for (int l = 0; l < L; ++l) {
        // The row's first pair (SPEC 4): ns.base and h W + q s are even, so the row is whole pairs.
        const uint64_t pair = (ns.base + uint64_t(uint32_t(h * W + t[l].q * S))) >> 1;
        RELAYOPS_UNROLL
        for (int m = 0; m < S / 2; ++m)
          normal_quad<A>(ns.key, pair + m, t[l].eps[2 * m], t[l].eps[2 * m + 1], t[l].g[2 * m], t[l].g[2 * m + 1]);
      }
    } else {
      if (output_row) {
        w.sync();
        for (int l = 0; l < L; ++l) load_row<S>(w.mem(l), pe + (h * a.eps.sh + t[l].q * S), t[l].writes, t[l].eps);
      }
      w.sync();
      for (int l = 0; l < L; ++l)
        load_row<S>(w.mem(l), pg + (h * a.eps2.sh + t[l].q * S), t[l].reads && a.has_block, t[l].g);
    }
    for (int l = 0; l < L; ++l) {
      A acc = t[l].g[S - 1];
      t[l].tail[S - 2] = acc;
      RELAYOPS_UNROLL
      for (int j = S - 3; j >= 0; --j) t[l].tail[j] = acc = acc + t[l].g[j + 1];
    }
    A halo[L][S - 1];  // the left lane's tails
    RELAYOPS_UNROLL
    for (int j = 0; j < S - 1; ++j) {
      A vals[L];
      for (int l = 0; l < L; ++l) vals[l] = t[l].tail[j];
      for (int l = 0; l < L; ++l) halo[l][j] = w.shfl_up(vals, l, 1);
    }
    for (int l = 0; l < L; ++l) {
      A acc = t[l].g[0];
      RELAYOPS_UNROLL
      for (int j = 0; j < S - 1; ++j) {
        if (j > 0) acc += t[l].g[j];
        t[l].ring[Slot][j] = acc + halo[l][j];
      }
      t[l].ring[Slot][S - 1] = acc + t[l].g[S - 1];
    }
  };

  if (noisy && rows > 0)
    static_for<0, S - 1>([&](auto k) {
      const int32_t h = p0 * S - (S - 1) + decltype(k)::value;  // at most s - 1 <= H - 1 above row 0
      input_row(h < 0 ? h + H : h, k, false);
    });
  for (int r = 0; r < rows; ++r) {
    const int32_t h0 = (p0 + r) * S;
    if constexpr (Op != RelayOp::kNoise) {
      // The transform term y of each lane's patch.
      A X[L][S][S];
      const auto load = [&](const ImageArg<const T>& img, A (&dst)[L][S][S]) {
        const T* base = img.plane(b, c) + h0 * img.sh;
        w.sync();
        for (int l = 0; l < L; ++l) load_patch_rows<S>(w.mem(l), base + t[l].q * S, img.sh, t[l].writes, dst[l]);
      };
      if constexpr (Op == RelayOp::kCorrupt) load(a.x, X);
      else load(a.x0, X);
      if constexpr (Op == RelayOp::kHeun) {
        // 2 x0_eff = (x + x0) - (sigma / sigma') (x' - x0') (SPEC 8); F is halved
        A Y[L][S][S], Z[L][S][S];
        load(a.x, Y);
        for (int l = 0; l < L; ++l)
          RELAYOPS_UNROLL
          for (int i = 0; i < S; ++i)
            RELAYOPS_UNROLL
            for (int j = 0; j < S; ++j) X[l][i][j] += Y[l][i][j];
        load(a.xp, Y);
        load(a.x0p, Z);
        for (int l = 0; l < L; ++l)
          RELAYOPS_UNROLL
          for (int i = 0; i < S; ++i)
            RELAYOPS_UNROLL
            for (int j = 0; j < S; ++j) X[l][i][j] -= ratio * (Y[l][i][j] - Z[l][i][j]);
      }
      if constexpr (Op == RelayOp::kSecond) {
        // F U + E dU, dU = patch_dct(x0_b - x0) (SPEC 8.1, patch.h second_order_coef)
        A Z[L][S][S];
        load(a.x0b, Z);
        for (int l = 0; l < L; ++l) {
          RELAYOPS_UNROLL
          for (int i = 0; i < S; ++i)
            RELAYOPS_UNROLL
            for (int j = 0; j < S; ++j) Z[l][i][j] -= X[l][i][j];
          transform_patch<S, false>(Z[l]);
          transform_patch<S, false>(X[l]);
          RELAYOPS_UNROLL
          for (int i = 0; i < S; ++i)
            RELAYOPS_UNROLL
            for (int j = 0; j < S; ++j) X[l][i][j] = second_order_coef(F[i][j], E[i][j], X[l][i][j], Z[l][i][j]);
          transform_patch<S, true>(X[l]);
        }
      } else {
        for (int l = 0; l < L; ++l) {
          transform_patch<S, false>(X[l]);
          RELAYOPS_UNROLL
          for (int i = 0; i < S; ++i)
            RELAYOPS_UNROLL
            for (int j = 0; j < S; ++j) X[l][i][j] *= F[i][j];
          transform_patch<S, true>(X[l]);
        }
      }
      for (int l = 0; l < L; ++l)
        RELAYOPS_UNROLL
        for (int i = 0; i < S; ++i)
          RELAYOPS_UNROLL
          for (int j = 0; j < S; ++j) t[l].y[i][j] = X[l][i][j];
    }
    static_for<0, S>([&](auto ic) {
      constexpr int i = decltype(ic)::value;
      const int32_t h = h0 + i;
      if (noisy) input_row(h, std::integral_constant<int, (S - 1 + i) % S>{}, true);
      [[maybe_unused]] A xr[L][S];  // relay_step: the row of x
      if constexpr (kStep) {
        w.sync();
        for (int l = 0; l < L; ++l) load_row<S>(w.mem(l), a.x.plane(b, c) + (h * a.x.sh + t[l].q * S), t[l].writes, xr[l]);
      }
      w.sync();
      for (int l = 0; l < L; ++l) {
        if (!t[l].writes) continue;
        A v[S];
        RELAYOPS_UNROLL
        for (int j = 0; j < S; ++j) {
          if constexpr (Op == RelayOp::kNoise) {
            v[j] = c_eps * t[l].eps[j];
          } else {
            v[j] = t[l].y[i][j];
            if constexpr (kStep) v[j] += ss.gamma * xr[l][j];
            if (noisy) v[j] += c_eps * t[l].eps[j];
          }
          if (noisy) {
            A box = t[l].ring[0][j];
            RELAYOPS_UNROLL
            for (int k = 1; k < S; ++k) box += t[l].ring[k][j];
            v[j] += c_box * box;
          }
        }
        store_row<S>(w.mem(l), po + (h * a.out.sh + t[l].q * S), v);
      }
    });
  }
}

// ---- Which kernel an input takes (host side) ----

// Which relay_warp computes the op of P (relay_step: Heun with x_prop, second order with x0_hat_b).
template <class A>
RelayOp relay_op(const Params<A>& P) {
  if (P.mode == kNoise) return RelayOp::kNoise;
  if (P.mode == kCorrupt) return RelayOp::kCorrupt;
  if (second_order(P)) return RelayOp::kSecond;
  return P.xp.present() ? RelayOp::kHeun : RelayOp::kEuler;
}

enum CudaPath : int { kPathTiles = 0, kPathPatch = 1, kPathBox = 2, kPathRelay = 3 };

// A view the specialised kernels can read or write: rows contiguous, the data pointer and the
// row, channel and sample strides multiples of the vector width, every offset inside a plane
// below 2^31 elements.
inline bool vector_view(const View& v, int64_t H, int64_t W, int vec, int elem_bytes) {
  if (v.sw != 1 || v.sh < 0 || v.sc < 0 || v.sn < 0) return false;
  if (reinterpret_cast<uintptr_t>(v.ptr) % uintptr_t(vec * elem_bytes)) return false;
  if (v.sh % vec || v.sc % vec || v.sn % vec) return false;
  return (H - 1) * v.sh + W <= int64_t(0x7fffffff);
}

template <class T, class A>
CudaPath choose_cuda_path(const Params<A>& P) {
  const int s = P.s;
  if (s < kFastMinS || s > kFastMaxS || P.W > 0x7fffffff || P.B * P.C > 65535) return kPathTiles;
  const int eb = int(sizeof(T));
  if (P.mode == kDct || P.mode == kIdct || P.mode == kBlur) {
    const int n = vec_elems<T>(s);
    if (!vector_view(P.x, P.H, P.W, n, eb) || !vector_view(P.out, P.H, P.W, n, eb)) return kPathTiles;
    if (fast_launch_shape(P.W / s, P.H / s, 1).grid.y > 65535) return kPathTiles;
    return kPathPatch;
  }
  // block_noise and its adjoint: the box term alone, read from eps2 (ops/_compiled.py block_noise)
  if (P.mode == kNoise && !P.draw && !P.has_eps && P.has_block && box_kernel_exists<A>(s)) {
    const int v = box_vec<T, A>(s);
    if (!vector_view(P.eps2, P.H, P.W, v, eb) || !vector_view(P.out, P.H, P.W, v, eb)) return kPathTiles;
    const int64_t rows = box_band_rows(s, P.H);
    if (fast_launch_shape(P.W / v, (P.H + rows - 1) / rows, 1).grid.y > 65535) return kPathTiles;
    return kPathBox;
  }
  // relay_noise, relay_corrupt, relay_step: every image the op reads or writes in vectors, and the
  // logical index of SPEC 4 inside a plane below 2^31
  if ((P.mode == kNoise && P.has_eps) || P.mode == kCorrupt || P.mode == kStep) {
    if (!relay_kernel_exists<A>(relay_op(P), s) || P.H * P.W > 0x7fffffff) return kPathTiles;
    const int n = vec_elems<T>(s);
    const bool given = needs_noise(P) && !P.draw;
    const auto fits = [&](const View& v) { return vector_view(v, P.H, P.W, n, eb); };
    if (!fits(P.out)) return kPathTiles;
    if (P.mode != kNoise && !fits(P.x)) return kPathTiles;
    if (P.mode == kStep && !fits(P.x0)) return kPathTiles;
    if (P.mode == kStep && P.xp.present() && !(fits(P.xp) && fits(P.x0p))) return kPathTiles;
    if (second_order(P) && !fits(P.x0b)) return kPathTiles;
    if (given && !(fits(P.eps) && (!P.has_block || fits(P.eps2)))) return kPathTiles;
    const int64_t warps = (P.W / s + kRelayLanes - 1) / kRelayLanes, npr = P.H / s;
    const int64_t rows = relay_band_rows(s, P.W / s, npr, P.B * P.C);
    if (fast_launch_shape(32 * warps, (npr + rows - 1) / rows, 1).grid.y > 65535) return kPathTiles;
    return kPathRelay;
  }
  return kPathTiles;
}

// f(integral_constant<int, S>) for the patch sizes with specialised kernels.
template <class F>
void with_fast_size(int s, F&& f) {
  switch (s) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
}

template <class T, class A>
PatchArgs<T, A> make_patch_args(const Params<A>& P) {
  PatchArgs<T, A> a{};
  a.x = static_cast<const T*>(P.x.ptr);
  a.out = static_cast<T*>(P.out.ptr);
  a.x_sn = P.x.sn, a.x_sc = P.x.sc, a.o_sn = P.out.sn, a.o_sc = P.out.sc;
  a.x_sh = int32_t(P.x.sh), a.o_sh = int32_t(P.out.sh);
  a.C = int32_t(P.C), a.npc = int32_t(P.W / P.s), a.npr = int32_t(P.H / P.s);
  a.tau = P.tau;
  a.d_min = P.d_min;
  return a;
}

inline LaunchShape patch_launch_shape(int64_t npc, int64_t npr, int64_t planes) {
  return fast_launch_shape(npc, npr, planes);
}

template <class T, class A>
BoxArgs<T, A> make_box_args(const Params<A>& P) {
  BoxArgs<T, A> a{};
  a.g = static_cast<const T*>(P.eps2.ptr);
  a.out = static_cast<T*>(P.out.ptr);
  a.g_sn = P.eps2.sn, a.g_sc = P.eps2.sc, a.o_sn = P.out.sn, a.o_sc = P.out.sc;
  a.g_sh = int32_t(P.eps2.sh), a.o_sh = int32_t(P.out.sh);
  a.C = int32_t(P.C), a.H = int32_t(P.H), a.W = int32_t(P.W);
  a.nstrips = int32_t(P.W / box_vec<T, A>(P.s));
  a.band_rows = box_band_rows(P.s, P.H);
  a.nbands = int32_t((P.H + a.band_rows - 1) / a.band_rows);
  a.scale = P.k * (P.alpha / A(P.s));
  return a;
}

template <class T, class A>
LaunchShape box_launch_shape(const BoxArgs<T, A>& a, int64_t planes) {
  return fast_launch_shape(a.nstrips, a.nbands, planes);
}

template <class T>
ImageArg<T> image_arg(const View& v) {
  return {static_cast<T*>(v.ptr), v.sn, v.sc, int32_t(v.sh)};
}

template <class T, class A>
RelayArgs<T, A> make_relay_args(const Params<A>& P) {
  RelayArgs<T, A> a{};
  a.x = image_arg<const T>(P.x), a.x0 = image_arg<const T>(P.x0), a.xp = image_arg<const T>(P.xp);
  a.x0p = image_arg<const T>(P.x0p), a.x0b = image_arg<const T>(P.x0b);
  a.eps = image_arg<const T>(P.eps), a.eps2 = image_arg<const T>(P.eps2);
  a.out = image_arg<T>(P.out);
  a.mode = P.mode, a.s = P.s;
  a.C = P.C, a.H = P.H, a.W = P.W;
  a.npc = int32_t(P.W / P.s), a.npr = int32_t(P.H / P.s);
  a.band_rows = relay_band_rows(P.s, a.npc, a.npr, P.B * P.C);
  a.nbands = (a.npr + a.band_rows - 1) / a.band_rows;
  a.sigma = P.sigma, a.sigma_next = P.sigma_next, a.tau = P.tau, a.tau_next = P.tau_next;
  a.correction = P.correction;
  a.eta = P.eta, a.d_min = P.d_min, a.alpha = P.alpha, a.k = P.k;
  a.key = P.key;
  a.seeds = P.seeds;
  a.source = !needs_noise(P) ? kNoNoise : P.draw ? kDrawnNoise : kGivenNoise;
  a.has_block = P.has_block;
  return a;
}

template <class T, class A>
LaunchShape relay_launch_shape(const RelayArgs<T, A>& a, int64_t planes) {
  return fast_launch_shape(32 * ((a.npc + kRelayLanes - 1) / kRelayLanes), a.nbands, planes);
}

}  // namespace relayops
