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

  // Box-Muller: u1 = ((a >> 8) + 1) 2^-24, u2 = (b >> 8) 2^-24, z = sqrt(-2 ln u1) cos(2 pi u2).
  // a = 0xffffffff gives u1 = 1 (z = 0); a = 0 gives u1 = 2^-24; b = 0 gives cos(0) = 1;
  // b = 0x80000000 gives u2 = 1/2, cos(pi) = -1.
  CHECK_NEAR(relayops::box_muller<double>(0xffffffffu, 0u), 0.0, 1e-15);
  const double r = std::sqrt(-2.0 * std::log(std::ldexp(1.0, -24)));
  CHECK_NEAR(relayops::box_muller<double>(0u, 0u), r, 1e-12);
  CHECK_NEAR(relayops::box_muller<double>(0u, 0x80000000u), -r, 1e-12);
  CHECK_NEAR(relayops::box_muller<float>(0u, 0x80000000u), -r, 1e-5);

  // Counter layout: the key is (seed low, seed high), the counter (e low, e high, off low, off high).
  const relayops::PhiloxKey key = relayops::make_key(0xa4093822299f31d0ull, 0x0370734413198a2eull);
  CHECK(key.k0 == 0x299f31d0u && key.k1 == 0xa4093822u && key.off0 == 0x13198a2eu && key.off1 == 0x03707344u);

  return finish("test_philox");
}
