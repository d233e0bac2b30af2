// Philox4x32-10 known-answer vectors (Random123's kat_vectors) and Box-Muller on fixed words.
#include <cstdint>

#include "check.h"
#include "relayops/philox.h"

using relayops::Philox4;
using relayops::philox4x32_10;

static void kat(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1, Philox4 want) {
  const Philox4 got = philox4x32_10(c0, c1, c2, c3, k0, k1);
  CHECK(got.x0 == want.x0);
  CHECK(got.x1 == want.x1);
  CHECK(got.x2 == want.x2);
  CHECK(got.x3 == want.x3);
  if (got.x0 != want.x0 || got.x1 != want.x1 || got.x2 != want.x2 || got.x3 != want.x3)
    std::printf("  got %08x %08x %08x %08x\n", got.x0, got.x1, got.x2, got.x3);
}

int main() {
  kat(0, 0, 0, 0, 0, 0, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u});
  kat(0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu,
      {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu});
  kat(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u,
      {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u});

  // Box-Muller: u1 = ((a >> 8) + 1) 2^-24, u2 = (b >> 8) 2^-24, rho = sqrt(-2 ln u1),
  // (z_cos, z_sin) = rho (cos(2 pi u2), sin(2 pi u2)). a = 0xffffffff gives u1 = 1 (rho = 0);
  // a = 0 gives u1 = 2^-24; b = 0, 0x40000000, 0x80000000, 0xc0000000 give u2 = 0, 1/4, 1/2, 3/4.
  const double r = std::sqrt(-2.0 * std::log(std::ldexp(1.0, -24)));
  const uint32_t angle[4] = {0u, 0x40000000u, 0x80000000u, 0xc0000000u};
  const double want_cos[4] = {r, 0.0, -r, 0.0}, want_sin[4] = {0.0, r, 0.0, -r};
  for (int i = 0; i < 4; ++i) {
    double zc, zs;
    relayops::box_muller<double>(0u, angle[i], zc, zs);
    CHECK_NEAR(zc, want_cos[i], 1e-12);
    CHECK_NEAR(zs, want_sin[i], 1e-12);
    float fc, fs;
    relayops::box_muller<float>(0u, angle[i], fc, fs);
    CHECK_NEAR(fc, want_cos[i], 1e-5);
    CHECK_NEAR(fs, want_sin[i], 1e-5);
    relayops::box_muller<float>(0xffffffffu, angle[i], fc, fs);
    CHECK(fc == 0.0f && fs == 0.0f);
  }

  // sin_2pi / cos_2pi against libm (float64) on a grid of 24-bit uniforms.
  double worst = 0.0;
  for (uint32_t k = 0; k < (1u << 24); k += 997) {
    const float t = float(k) * 5.9604644775390625e-8f;
    const double x = 6.283185307179586 * double(k) * 5.9604644775390625e-8;
    worst = std::fmax(worst, std::fabs(relayops::sin_2pi(t) - std::sin(x)));
    worst = std::fmax(worst, std::fabs(relayops::cos_2pi(t) - std::cos(x)));
  }
  CHECK(worst < 3e-7);

  // Pair layout: normal_quad(q) = (eps[2q], eps[2q + 1], eps2[2q], eps2[2q + 1]) from the words of
  // counter (q, offset); normal_pair(e) picks element e's two.
  {
    const relayops::PhiloxKey k = relayops::make_key(0x0123456789abcdefull, 0x00000007fedcba98ull);
    const uint64_t q = 0x100000003ull;
    const Philox4 w = philox4x32_10(uint32_t(q), uint32_t(q >> 32), k.off0, k.off1, k.k0, k.k1);
    double a0, a1, b0, b1, c0, c1, p, pp;
    relayops::normal_quad<double>(k, q, a0, a1, b0, b1);
    relayops::box_muller<double>(w.x0, w.x1, c0, c1);
    CHECK(a0 == c0 && a1 == c1);
    relayops::box_muller<double>(w.x2, w.x3, c0, c1);
    CHECK(b0 == c0 && b1 == c1);
    relayops::normal_pair<double>(k, 2 * q, p, pp);
    CHECK(p == a0 && pp == b0);
    relayops::normal_pair<double>(k, 2 * q + 1, p, pp);
    CHECK(p == a1 && pp == b1);
  }

  // Counter layout: the key is (seed low, seed high), the counter (e low, e high, off low, off high).
  const relayops::PhiloxKey key = relayops::make_key(0xa4093822299f31d0ull, 0x0370734413198a2eull);
  CHECK(key.k0 == 0x299f31d0u && key.k1 == 0xa4093822u && key.off0 == 0x13198a2eu && key.off1 == 0x03707344u);

  return finish("test_philox");
}
