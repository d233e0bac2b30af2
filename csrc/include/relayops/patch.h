// Math shared by the CPU and CUDA kernels (SPEC 1-3, 6, 8): the s x s orthonormal DCT, the blur
// response, the per-sample constants and per-pixel formulas of the fused updates, and the
// per-patch updates of patch_dct / patch_idct / patch_blur / relay_noise / relay_corrupt /
// relay_step that the CPU kernels run for run-time s (the CUDA kernels' tiles are in tile.h).
//
// Template parameter S is the patch size when it is known at compile time (2, 4, 8: fully
// unrolled), or 0 for a run-time s <= kMaxS. T is the storage type, A the accumulation type
// (float, or double for float64 data).
#pragma once
#include "common.h"
#include "philox.h"

namespace relayops {

enum Mode : int { kDct = 0, kIdct = 1, kBlur = 2, kNoise = 3, kCorrupt = 4, kStep = 5 };

// Everything one call needs; passed by value to CUDA kernels (under the 4 KB parameter limit).
template <class A>
struct Params {
  using acc = A;  // the accumulation type (the per-sample helpers below also take the specialised
                  // kernels' argument structs, which name the same fields)
  int mode, s;
  int64_t B, C, H, W;
  View x, x0, xp, x0p, x0b, eps, eps2, out;  // ptr == nullptr: absent (x0b: second-order relay_step)
  const A* sigma;       // [B] contiguous, or nullptr
  const A* sigma_next;  // [B]
  const A* tau;         // [B]
  const A* tau_next;    // [B]
  const A* correction;  // [B, s, s] second-order factor E of relay_step (SPEC 8.1), or nullptr
  A eta, d_min, alpha, k;
  PhiloxKey key;        // seed and offset words (SPEC 4)
  const int64_t* seeds; // [B] per-sample seeds, or nullptr: one stream (key) for the whole batch
  int draw;       // 1: eps/eps2 drawn from key (SPEC 4); 0: read from the eps/eps2 views
  int has_eps;    // the eps term of the noise is present
  int has_block;  // the alpha * block_noise(eps2) term is present
  int shift;      // 0: box sum over (x - i, y - j) (block_noise); s - 1: its transpose (x + i, y + j)
  A dct[kMaxS * kMaxS];  // DCT-II matrix, C[k * s + n]
};

// C[k, n] = c_k cos(pi (2n + 1) k / (2s)), c_0 = sqrt(1/s), c_k = sqrt(2/s) (SPEC 1). Host side.
template <class A>
inline void fill_dct_matrix(Params<A>& P) {
  const int s = P.s;
  for (int k = 0; k < s; ++k)
    for (int n = 0; n < s; ++n) {
      const double ck = std::sqrt((k == 0 ? 1.0 : 2.0) / s);
      P.dct[k * s + n] = A(ck * std::cos(3.141592653589793 * (2 * n + 1) * k / (2.0 * s)));
    }
}

template <class A>
RELAYOPS_HD bool needs_noise(const Params<A>& P) {
  return P.mode == kNoise || P.mode == kCorrupt || (P.mode == kStep && P.eta != A(0));
}

// Entry (r, c) of M = C, or of M = C^T when Transposed.
template <bool Transposed, class A>
RELAYOPS_HD A dct_entry(const A* C, int n, int r, int c) {
  return Transposed ? C[c * n + r] : C[r * n + c];
}

// X <- M X M^T in place with M = C (Inverse = false: U = C X C^T) or M = C^T (Inverse = true:
// X = C^T U C). X is row-major with row stride N = (S ? S : kMaxS).
template <int S, bool Inverse, class A>
RELAYOPS_HD void transform2(const A* C, int s_rt, A* X) {
  constexpr int N = S ? S : kMaxS;
  const int n = S ? S : s_rt;
  A T[N * N];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      A acc = 0;
      for (int k = 0; k < n; ++k) acc += dct_entry<Inverse>(C, n, i, k) * X[k * N + j];
      T[i * N + j] = acc;
    }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      A acc = 0;
      for (int k = 0; k < n; ++k) acc += T[i * N + k] * dct_entry<Inverse>(C, n, j, k);
      X[i * N + j] = acc;
    }
}

template <int S, class A>
RELAYOPS_HD void dct2(const A* C, int s_rt, A* X) { transform2<S, false>(C, s_rt, X); }

template <int S, class A>
RELAYOPS_HD void idct2(const A* C, int s_rt, A* X) { transform2<S, true>(C, s_rt, X); }

// D_ij(tau) = (1 - d_min) exp(-lambda_ij tau) + d_min, lambda_ij = pi^2 (i^2 + j^2) / s^2 (SPEC 2).
template <class A>
RELAYOPS_HD A blur_response(int i, int j, int s, A tau, A d_min) {
  const A lam = A(9.869604401089358) * A(i * i + j * j) / A(s * s);
  return (A(1) - d_min) * exp(-lam * tau) + d_min;
}

// Per-sample scalars of the fused updates.
template <class A>
struct SampleScalars {
  A gamma, sigma, sigma_next, noise_scale;
};

template <class Args, class A = typename Args::acc>
RELAYOPS_HD SampleScalars<A> sample_scalars(const Args& P, int64_t b) {
  SampleScalars<A> sc;
  sc.gamma = 0;
  sc.noise_scale = 1;
  sc.sigma = P.sigma ? P.sigma[b] : A(1);
  sc.sigma_next = P.sigma_next ? P.sigma_next[b] : A(1);
  if (P.mode == kStep) {
    // gamma = sqrt(1 - eta^2) sigma' / sigma (SPEC 8)
    sc.gamma = sqrt(A(1) - P.eta * P.eta) * sc.sigma_next / sc.sigma;
    sc.noise_scale = P.eta * sc.sigma_next;
  } else if (P.mode == kCorrupt) {
    sc.noise_scale = sc.sigma;
  }
  return sc;
}

// The coefficient factor F_ij applied between the DCT and its inverse: D(tau') - gamma D(tau)
// (relay_step, SPEC 8) or D(tau) (patch_blur, relay_corrupt).
template <class Args, class A = typename Args::acc>
RELAYOPS_HD A coef_factor(const Args& P, const SampleScalars<A>& sc, int64_t b, int i, int j) {
  if (P.mode == kStep)
    return blur_response(i, j, P.s, P.tau_next[b], P.d_min) - sc.gamma * blur_response(i, j, P.s, P.tau[b], P.d_min);
  return blur_response(i, j, P.s, P.tau[b], P.d_min);
}

template <class A>
RELAYOPS_HD bool uses_factor(const Params<A>& P) {
  return P.mode == kBlur || P.mode == kCorrupt || P.mode == kStep;
}

// Second-order relay_step (SPEC 8.1): the coefficients gain E (x0_b - x0), E = correction[b].
template <class A>
RELAYOPS_HD bool second_order(const Params<A>& P) {
  return P.mode == kStep && P.correction != nullptr;
}

// Entry (i, j) of sample b's correction factor E.
template <class Args, class A = typename Args::acc>
RELAYOPS_HD A correction_factor(const Args& P, int64_t b, int i, int j) {
  return P.correction[(b * P.s + i) * P.s + j];
}

// The coefficient of the second-order step at one frequency, from this step's x0's coefficient u
// and du, that of x0b - x0 (SPEC 8.1): F u + E du.
template <class A>
RELAYOPS_HD A second_order_coef(A f, A e, A u, A du) {
  return f * u + e * du;
}

// The scalars plus F (and E, second order) for every (i, j) of a patch (the CPU loops keep them
// per thread).
template <int S, class A>
struct SampleConsts : SampleScalars<A> {
  A F[(S ? S : kMaxS) * (S ? S : kMaxS)];
  A E[(S ? S : kMaxS) * (S ? S : kMaxS)];
};

template <int S, class A>
RELAYOPS_HD void sample_consts(const Params<A>& P, int64_t b, SampleConsts<S, A>& sc) {
  constexpr int N = S ? S : kMaxS;
  const int n = S ? S : P.s;
  static_cast<SampleScalars<A>&>(sc) = sample_scalars(P, b);
  if (uses_factor(P))
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) sc.F[i * N + j] = coef_factor(P, sc, b, i, j);
  if (second_order(P))
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) sc.E[i * N + j] = correction_factor(P, b, i, j);
}

// Heun (SPEC 8): x0_eff = x - sigma (d + d') / 2 with d = (x - x0) / sigma, d' = (x' - x0') / sigma'.
template <class A>
RELAYOPS_HD A heun_x0(A x, A x0, A xp, A x0p, A sigma, A sigma_next) {
  const A d = (x - x0) / sigma, dp = (xp - x0p) / sigma_next;
  return x - sigma * (d + dp) / A(2);
}

// The last terms of an update, y being the patch_idct of the scaled coefficients: relay_corrupt
// y + sigma n (SPEC 6), relay_step gamma x + y + eta sigma' n (SPEC 8, the noise only for eta != 0),
// else y.
template <class A>
RELAYOPS_HD A finish_update(const Params<A>& P, const SampleScalars<A>& sc, A x, A y, A noise) {
  if (P.mode == kCorrupt) return y + sc.noise_scale * noise;
  if (P.mode != kStep) return y;
  A v = sc.gamma * x + y;
  if (P.eta != A(0)) v += sc.noise_scale * noise;
  return v;
}

// Relay noise k (eps + alpha/s box) (SPEC 3) from a pixel's eps and its s x s box sum of eps2,
// with the terms the flags leave out dropped.
template <class A>
RELAYOPS_HD A relay_noise_value(const Params<A>& P, A eps, A box) {
  A v = P.has_eps ? eps : A(0);
  if (P.has_block) v += P.alpha / A(P.s) * box;
  return P.k * v;
}

// Where plane (b, c) draws its noise (SPEC 4): the Philox key and the logical index of the plane's
// first element. One int seed: the batch's key, indices over the whole batch. Per-sample seeds: the
// key of seeds[b], indices within the sample, so a sample draws what it would draw alone.
struct NoiseStream {
  PhiloxKey key;
  uint64_t base;
};

template <class Args>
RELAYOPS_HD NoiseStream noise_stream(const Args& P, int64_t b, int64_t c) {
  if (P.seeds) return {with_seed(P.key, uint64_t(P.seeds[b])), uint64_t(c * P.H * P.W)};
  return {P.key, uint64_t((b * P.C + c) * P.H * P.W)};
}

template <int S, class T, class A>
RELAYOPS_HD void load_patch(const View& v, int64_t b, int64_t c, int64_t h0, int64_t w0, int n, A* X) {
  constexpr int N = S ? S : kMaxS;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) X[i * N + j] = load_elem<A>(v.template at<const T>(b, c, h0 + i, w0 + j));
}

template <int S, class T, class A>
RELAYOPS_HD void store_patch(const View& v, int64_t b, int64_t c, int64_t h0, int64_t w0, int n, const A* X) {
  constexpr int N = S ? S : kMaxS;
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) store_elem<A>(v.template at<T>(b, c, h0 + i, w0 + j), X[i * N + j]);
}

// The fused update of one patch (p, q) of plane (b, c). noise: the patch's relay noise (row
// stride ns) when needs_noise(P), else unused.
template <int S, class T, class A>
RELAYOPS_HD void process_patch(const Params<A>& P, const SampleConsts<S, A>& sc, int64_t b, int64_t c,
                               int64_t p, int64_t q, const A* noise, int64_t ns) {
  constexpr int N = S ? S : kMaxS;
  const int n = S ? S : P.s;
  const int64_t h0 = p * n, w0 = q * n;
  A X[N * N];
  switch (P.mode) {
    case kDct:
      load_patch<S, T, A>(P.x, b, c, h0, w0, n, X);
      dct2<S, A>(P.dct, n, X);
      break;
    case kIdct:
      load_patch<S, T, A>(P.x, b, c, h0, w0, n, X);
      idct2<S, A>(P.dct, n, X);
      break;
    case kBlur:
    case kCorrupt:  // patch_idct(D(tau) patch_dct(y)) [+ sigma n] (SPEC 2, 6)
      load_patch<S, T, A>(P.x, b, c, h0, w0, n, X);
      dct2<S, A>(P.dct, n, X);
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) X[i * N + j] *= sc.F[i * N + j];
      idct2<S, A>(P.dct, n, X);
      if (P.mode == kCorrupt)
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) X[i * N + j] = finish_update(P, sc, A(0), X[i * N + j], noise[i * ns + j]);
      break;
    case kNoise:
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) X[i * N + j] = noise[i * ns + j];
      break;
    case kStep: {  // gamma x + patch_idct(F patch_dct(x0) [+ E patch_dct(x0b - x0)]) + eta sigma' n (SPEC 8, 8.1)
      A Y[N * N], Z[N * N];
      load_patch<S, T, A>(P.x, b, c, h0, w0, n, X);
      load_patch<S, T, A>(P.x0, b, c, h0, w0, n, Y);
      if (P.xp.present()) {  // Heun: x0_eff = x - sigma (d + d') / 2
        A Zh[N * N];
        load_patch<S, T, A>(P.xp, b, c, h0, w0, n, Z);
        load_patch<S, T, A>(P.x0p, b, c, h0, w0, n, Zh);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) {
            const int e = i * N + j;
            Y[e] = heun_x0(X[e], Y[e], Z[e], Zh[e], sc.sigma, sc.sigma_next);
          }
      }
      const bool second = second_order(P);
      if (second) {  // Z = patch_dct(x0b - x0)
        load_patch<S, T, A>(P.x0b, b, c, h0, w0, n, Z);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < n; ++j) Z[i * N + j] -= Y[i * N + j];
        dct2<S, A>(P.dct, n, Z);
      }
      dct2<S, A>(P.dct, n, Y);
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) {
          const int e = i * N + j;
          Y[e] = second ? second_order_coef(sc.F[e], sc.E[e], Y[e], Z[e]) : sc.F[e] * Y[e];
        }
      idct2<S, A>(P.dct, n, Y);
      const bool noisy = P.eta != A(0);  // else there is no noise array
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j)
          X[i * N + j] = finish_update(P, sc, X[i * N + j], Y[i * N + j], noisy ? noise[i * ns + j] : A(0));
      break;
    }
  }
  store_patch<S, T, A>(P.out, b, c, h0, w0, n, X);
}

}  // namespace relayops
