// Host-side argument packing shared by the two pybind11 modules: Python passes plain integers
// (data pointers, element strides) and floats; this builds the Params the kernels take.
#pragma once
#include <array>
#include <stdexcept>
#include <vector>

#include "patch.h"

namespace relayops {

using ViewArg = std::array<int64_t, 5>;  // (data pointer or 0, stride N, C, H, W in elements)

struct CallArgs {
  int mode, dtype, s;
  std::array<int64_t, 4> shape;       // B, C, H, W
  std::vector<ViewArg> views;         // x, x0, xp, x0p, x0b, eps, eps2, out
  std::array<int64_t, 5> per_sample;  // sigma, sigma_next, tau, tau_next [B], correction [B, s, s] pointers (or 0)
  int64_t seeds;                      // [B] int64 per-sample seeds data pointer, or 0
  std::array<double, 4> scalars;      // eta, d_min, alpha, k
  uint64_t seed, offset;
  std::array<int, 4> flags;           // draw, has_eps, has_block, shift
};

inline View to_view(const ViewArg& v) {
  return View{reinterpret_cast<void*>(v[0]), v[1], v[2], v[3], v[4]};
}

template <class A>
Params<A> make_params(const CallArgs& a) {
  if (a.s < 1 || a.s > kMaxS) throw std::invalid_argument("relayops: compiled kernels need 1 <= s <= 16");
  if (a.views.size() != 8) throw std::invalid_argument("relayops: expected 8 views");
  if (a.shape[2] % a.s || a.shape[3] % a.s) throw std::invalid_argument("relayops: H and W must be multiples of s");
  if (!a.views[7][0]) throw std::invalid_argument("relayops: missing output");
  Params<A> P{};
  P.mode = a.mode;
  P.s = a.s;
  P.B = a.shape[0]; P.C = a.shape[1]; P.H = a.shape[2]; P.W = a.shape[3];
  View* dst[8] = {&P.x, &P.x0, &P.xp, &P.x0p, &P.x0b, &P.eps, &P.eps2, &P.out};
  for (int i = 0; i < 8; ++i) *dst[i] = to_view(a.views[i]);
  P.sigma = reinterpret_cast<const A*>(a.per_sample[0]);
  P.sigma_next = reinterpret_cast<const A*>(a.per_sample[1]);
  P.tau = reinterpret_cast<const A*>(a.per_sample[2]);
  P.tau_next = reinterpret_cast<const A*>(a.per_sample[3]);
  P.correction = reinterpret_cast<const A*>(a.per_sample[4]);
  P.eta = A(a.scalars[0]); P.d_min = A(a.scalars[1]); P.alpha = A(a.scalars[2]); P.k = A(a.scalars[3]);
  P.key = make_key(a.seed, a.offset);
  P.seeds = reinterpret_cast<const int64_t*>(a.seeds);
  P.draw = a.flags[0]; P.has_eps = a.flags[1]; P.has_block = a.flags[2]; P.shift = a.flags[3];
  fill_dct_matrix(P);
  return P;
}

}  // namespace relayops
