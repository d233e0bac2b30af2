// Philox4x32-10 and Box-Muller with the counter layout of SPEC 4 / relayops/reference/philox.py:
// key = (seed low, seed high), counter = (e low, e high, offset low, offset high), e the element's
// logical NCHW index; stream 0 = box_muller(x0, x1), stream 1 = box_muller(x2, x3).
#pragma once
#include "common.h"

namespace relayops {

struct Philox4 { uint32_t x0, x1, x2, x3; };

RELAYOPS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;  // the key is bumped between rounds (the bump after the last is unused)
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// ln(u) for u in (0, 1] and cos(2 pi t) for t in [0, 1), float32, branch-free so that CPU loops
// vectorise; absolute errors ~1e-7, far inside the 1e-5 cross-backend tolerance of SPEC 4.
RELAYOPS_HD float log_unit(float u) {
  // u = 2^e m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(z), z = (m - 1)/(m + 1), |z| < 0.172.
  // Pure integer arithmetic (no selects) so that GCC vectorises it for AVX2 too.
  const uint32_t bits = float_to_bits(u);
  const uint32_t mant = bits & 0x007fffffu;
  const uint32_t big = (0x003504f3u - mant) >> 31;  // 1 when the mantissa exceeds sqrt(2)'s
  const float m = bits_to_float(mant | (0x3f800000u - (big << 23)));
  const float e = float(int32_t(bits >> 23) - 127 + int32_t(big));
  const float z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
  const float series = 2.0f * z * (1.0f + z2 * (1.0f / 3 + z2 * (1.0f / 5 + z2 * (1.0f / 7 + z2 * (1.0f / 9)))));
  return e * 0.693147180559945f + series;
}

RELAYOPS_HD float cos_2pi(float t) {
  // cos(2 pi t) = sign * cos(2 pi b), b = distance of t to the nearest half-integer side, in [0, 1/4].
  const float r = t - float(int32_t(t + 0.5f));  // in [-1/2, 1/2], exact for 24-bit t in [0, 1)
  const float a = fabsf(r);
  const float flip = float(a > 0.25f);
  const float b = a + flip * (0.5f - 2.0f * a);  // a, or 1/2 - a
  const float x = 6.28318530717958647f * b, y = x * x;  // x in [0, pi/2]
  const float c = 1.0f + y * (-1.0f / 2 + y * (1.0f / 24 + y * (-1.0f / 720 + y * (1.0f / 40320 +
                  y * (-1.0f / 3628800 + y * (1.0f / 479001600))))));
  return c * (1.0f - 2.0f * flip);
}

// One standard normal from two words: cosine branch, 24-bit uniforms u1 in (0, 1], u2 in [0, 1).
template <class A>
RELAYOPS_HD A box_muller(uint32_t a, uint32_t b) {
  const A u1 = A((a >> 8) + 1u) * A(5.9604644775390625e-8);  // 2^-24
  const A u2 = A(b >> 8) * A(5.9604644775390625e-8);
#if defined(__CUDA_ARCH__)
  // cos(pi t) without cos's argument reduction, whose slow path needs a local-memory array
  return sqrt(A(-2) * log(u1)) * cospi(A(2) * u2);
#else
  return sqrt(A(-2) * log(u1)) * cos(A(6.283185307179586) * u2);
#endif
}

template <>
RELAYOPS_HD float box_muller<float>(uint32_t a, uint32_t b) {
  // via int32 (the values are < 2^25): signed conversions vectorise where unsigned ones do not (AVX2)
  const float u1 = float(int32_t((a >> 8) + 1u)) * 5.9604644775390625e-8f;
  const float u2 = float(int32_t(b >> 8)) * 5.9604644775390625e-8f;
  return sqrt(-2.0f * log_unit(u1)) * cos_2pi(u2);
}

// The seed/offset words of SPEC 4.
struct PhiloxKey {
  uint32_t k0, k1, off0, off1;
};

RELAYOPS_HD PhiloxKey make_key(uint64_t seed, uint64_t offset) {
  return {uint32_t(seed), uint32_t(seed >> 32), uint32_t(offset), uint32_t(offset >> 32)};
}

// The same offset under another seed (a per-sample seed).
RELAYOPS_HD PhiloxKey with_seed(PhiloxKey key, uint64_t seed) {
  key.k0 = uint32_t(seed);
  key.k1 = uint32_t(seed >> 32);
  return key;
}

// eps (stream 0) and eps2 (stream 1) for the element with logical NCHW index e.
template <class A>
RELAYOPS_HD void normal_pair(const PhiloxKey& key, uint64_t e, A& eps, A& eps2) {
  const Philox4 r = philox4x32_10(uint32_t(e), uint32_t(e >> 32), key.off0, key.off1, key.k0, key.k1);
  eps = box_muller<A>(r.x0, r.x1);
  eps2 = box_muller<A>(r.x2, r.x3);
}

}  // namespace relayops
