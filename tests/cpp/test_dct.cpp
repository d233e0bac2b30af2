// DCT-II matrix orthogonality (C C^T = I) and dct2/idct2 round trips for compile-time and run-time s.
#include <vector>

#include "check.h"
#include "relayops/patch.h"

using namespace relayops;

template <int S>
static void round_trip(int s) {
  Params<double> P{};
  P.s = s;
  fill_dct_matrix(P);
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) {
      double acc = 0;
      for (int k = 0; k < s; ++k) acc += P.dct[i * s + k] * P.dct[j * s + k];
      CHECK_NEAR(acc, i == j ? 1.0 : 0.0, 1e-13);
    }
  constexpr int N = S ? S : kMaxS;
  double X[N * N], Y[N * N];
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) X[i * N + j] = Y[i * N + j] = std::sin(1.0 + 3 * i + 7 * j);
  dct2<S, double>(P.dct, s, Y);
  // DC coefficient of the orthonormal 2-D DCT is sum / s; energy is preserved (Parseval).
  double sum = 0, e_x = 0, e_u = 0;
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) {
      sum += X[i * N + j];
      e_x += X[i * N + j] * X[i * N + j];
      e_u += Y[i * N + j] * Y[i * N + j];
    }
  CHECK_NEAR(Y[0], sum / s, 1e-12);
  CHECK_NEAR(e_u, e_x, 1e-11);
  idct2<S, double>(P.dct, s, Y);
  for (int i = 0; i < s; ++i)
    for (int j = 0; j < s; ++j) CHECK_NEAR(Y[i * N + j], X[i * N + j], 1e-12);
  // blur response: D_00 = 1 for any tau, tau = 0 is the identity.
  CHECK_NEAR(blur_response(0, 0, s, 2.5, 0.001), 1.0, 1e-15);
  CHECK_NEAR(blur_response(s - 1, 1, s, 0.0, 0.001), 1.0, 1e-15);
}

int main() {
  round_trip<2>(2);
  round_trip<4>(4);
  round_trip<8>(8);
  for (int s = 1; s <= kMaxS; ++s) round_trip<0>(s);
  return finish("test_dct");
}
