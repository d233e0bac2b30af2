// Block sum of SPEC 3 on a small grid, through the CUDA kernels' tile phases (emulated on the
// CPU): its exact covariance for white input, M M^T (M the linear map), must be
// max(0, s - |dx|) max(0, s - |dy|) / s^2 at wraparound distances; the transposed sum is M^T.
#include <algorithm>
#include <cstdlib>
#include <vector>

#include "check.h"
#include "relayops/tile.h"

using namespace relayops;

static const int H = 8, W = 12, S = 4;

// out = block_noise(g) (shift = 0) or its transpose (shift = s - 1), with the tiles of the CUDA kernels.
static std::vector<double> box(const std::vector<double>& g, int shift) {
  std::vector<double> out(H * W, -1.0);
  Params<double> P{};
  P.mode = kNoise;
  P.s = S;
  P.B = 1; P.C = 1; P.H = H; P.W = W;
  P.eps2 = View{const_cast<double*>(g.data()), H * W, H * W, W, 1};
  P.out = View{out.data(), H * W, H * W, W, 1};
  P.alpha = 1.0;
  P.k = 1.0;
  P.has_block = 1;
  P.shift = shift;
  emulate_tiles<S, double, double>(P);
  return out;
}

int main() {
  const int n = H * W;
  std::vector<double> M(n * n), MT(n * n);  // M[i * n + j] = d out_i / d g_j
  for (int j = 0; j < n; ++j) {
    std::vector<double> e(n, 0.0);
    e[j] = 1.0;
    const std::vector<double> col = box(e, 0), colT = box(e, S - 1);
    for (int i = 0; i < n; ++i) {
      M[i * n + j] = col[i];
      MT[i * n + j] = colT[i];
    }
  }
  for (int a = 0; a < n; ++a)
    for (int b = 0; b < n; ++b) {
      double cov = 0;
      for (int j = 0; j < n; ++j) cov += M[a * n + j] * M[b * n + j];
      int dx = std::abs(a / W - b / W), dy = std::abs(a % W - b % W);
      dx = std::min(dx, H - dx);
      dy = std::min(dy, W - dy);
      const double want = std::max(0, S - dx) * std::max(0, S - dy) / double(S * S);
      CHECK_NEAR(cov, want, 1e-12);
      CHECK_NEAR(MT[a * n + b], M[b * n + a], 1e-15);
    }
  return finish("test_block_sum");
}
