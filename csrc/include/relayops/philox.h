// Philox4x32-10 and Box-Muller with the layout of SPEC 4 / relayops/reference/philox.py: one
// Philox call per pair of elements. Pair q = e >> 1 (e the element's logical NCHW index) has
// key = (seed low, seed high), counter = (q low, q high, offset low, offset high) and words
// (x0, x1, x2, x3); Box-Muller of (x0, x1) gives eps[2q] (cosine) and eps[2q + 1] (sine), of
// (x2, x3) eps2[2q] and eps2[2q + 1].
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

// a / b; on the device a times the hardware reciprocal (rcp.approx.ftz: MUFU.RCP alone, 2 ulp for
// the quotient), which avoids the IEEE divide's slow path and, b here being in [1.7, 2.5], needs
// none of __fdividef's guards for subnormal or huge b.
RELAYOPS_HD float fast_divide(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return a * r;
#else
  return a / b;
#endif
}

// sqrt(v) for v >= 0; on the device v rsqrt(v) (rsqrt.approx.ftz: MUFU.RSQ alone, 2 ulp), which
// avoids the IEEE square root's slow path and rsqrtf's guard for subnormal v (the clamp keeps v
// normal, and v = 0 at 0 instead of 0 * inf).
RELAYOPS_HD float fast_sqrt(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(fmaxf(v, 1e-30f)));
  return v * r;
#else
  return sqrt(v);
#endif
}

// ln(u) for u in (0, 1], and cos(2 pi t), sin(2 pi t) for t in [0, 1), float32, branch-free so
// that CPU loops vectorise; absolute errors ~1e-7, far inside the 1e-5 cross-backend tolerance
// of SPEC 4.
RELAYOPS_HD float log_unit(float u) {
  // u = 2^e m with m in [sqrt(1/2), sqrt(2)); ln m = 2 atanh(z), z = (m - 1)/(m + 1), |z| < 0.172.
  // Pure integer arithmetic (no selects) so that GCC vectorises it for AVX2 too.
  const uint32_t bits = float_to_bits(u);
  const uint32_t mant = bits & 0x007fffffu;
  const uint32_t big = (0x003504f3u - mant) >> 31;  // 1 when the mantissa exceeds sqrt(2)'s
  const float m = bits_to_float(mant | (0x3f800000u - (big << 23)));
  const float e = float(int32_t(bits >> 23) - 127 + int32_t(big));
  const float z = fast_divide(m - 1.0f, m + 1.0f), z2 = z * z;
  const float series = 2.0f * z * (1.0f + z2 * (1.0f / 3 + z2 * (1.0f / 5 + z2 * (1.0f / 7 + z2 * (1.0f / 9)))));
  return e * 0.693147180559945f + series;
}

// sin(2 pi t) and cos(2 pi t) for t in [0, 1) (exact multiples of 2^-24, as the uniforms of
// SPEC 4), sharing one argument reduction, every step exact: r = t - round(t) in [-1/2, 1/2],
// a = |r|, b = min(a, 1/2 - a) in [0, 1/4], d = min(b, 1/4 - b) in [0, 1/8]; then
// cos(2 pi b), sin(2 pi b) = cos(2 pi d), sin(2 pi d), swapped where b > 1/8;
// cos(2 pi t) = -cos(2 pi b) where a > 1/4, sin(2 pi t) = sign(r) sin(2 pi b). Taylor series in
// x = 2 pi d in [0, pi/4], cosine to x^10, sine to x^9 (first omitted terms below 2e-10 and 2e-9).
// Selects, no branches (compare-and-select on the GPU, blends in vectorised CPU loops).
RELAYOPS_HD void sincos_2pi(float t, float& s, float& c) {
  const float r = t - float(int32_t(t + 0.5f));
  const float a = fabsf(r);
  const bool fold = a > 0.25f;
  const float b = fold ? 0.5f - a : a;
  const bool swapped = b > 0.125f;
  const float d = swapped ? 0.25f - b : b;
  const float x = 6.28318530717958647f * d, y = x * x;
  const float cd = 1.0f + y * (-1.0f / 2 + y * (1.0f / 24 + y * (-1.0f / 720 + y * (1.0f / 40320 +
                   y * (-1.0f / 3628800)))));
  const float sd = x * (1.0f + y * (-1.0f / 6 + y * (1.0f / 120 + y * (-1.0f / 5040 + y * (1.0f / 362880)))));
  const float cb = swapped ? sd : cd, sb = swapped ? cd : sd;
  c = fold ? -cb : cb;
  s = r < 0.0f ? -sb : sb;
}

RELAYOPS_HD float cos_2pi(float t) {
  float s, c;
  sincos_2pi(t, s, c);
  return c;
}

RELAYOPS_HD float sin_2pi(float t) {
  float s, c;
  sincos_2pi(t, s, c);
  return s;
}

// Box-Muller of two words, both branches: u1 = ((a >> 8) + 1) 2^-24 in (0, 1],
// u2 = (b >> 8) 2^-24 in [0, 1) (24-bit uniforms, exact in float32); rho = sqrt(-2 ln u1),
// z_cos = rho cos(2 pi u2), z_sin = rho sin(2 pi u2).
template <class A>
RELAYOPS_HD void box_muller(uint32_t a, uint32_t b, A& z_cos, A& z_sin) {
  const A u1 = A((a >> 8) + 1u) * A(5.9604644775390625e-8);  // 2^-24
  const A u2 = A(b >> 8) * A(5.9604644775390625e-8);
  const A rho = sqrt(A(-2) * log(u1));
  A s, c;
#if defined(__CUDA_ARCH__)
  sincospi(A(2) * u2, &s, &c);  // no argument reduction slow path (unlike sin/cos)
#else
  s = sin(A(6.283185307179586) * u2);
  c = cos(A(6.283185307179586) * u2);
#endif
  z_cos = rho * c;
  z_sin = rho * s;
}

template <>
RELAYOPS_HD void box_muller<float>(uint32_t a, uint32_t b, float& z_cos, float& z_sin) {
  // via int32 (the values are < 2^25): signed conversions vectorise where unsigned ones do not (AVX2)
  const float u1 = float(int32_t((a >> 8) + 1u)) * 5.9604644775390625e-8f;
  const float rho = fast_sqrt(-2.0f * log_unit(u1));
#if defined(__CUDA_ARCH__)
  // The hardware sine and cosine (MUFU.SIN, MUFU.COS: absolute error below 2^-21.19 on
  // [-pi, pi], about 4 instructions for both against about 28 for sincos_2pi) of the turn
  // t = u2 - 1/2 in [-1/2, 1/2), exact; cos(2 pi u2) = -cos(2 pi t), sin(2 pi u2) = -sin(2 pi t).
  // Each normal is then within 5e-6 of its float64 value (rho <= 5.8; docs/spec.md 13.8): inside
  // SPEC 4's 1e-5.
  const float t = float(int32_t(b >> 8)) * 5.9604644775390625e-8f - 0.5f;
  float s, c;
  __sincosf(6.28318530717958647f * t, &s, &c);
  z_cos = -rho * c;
  z_sin = -rho * s;
#else
  const float u2 = float(int32_t(b >> 8)) * 5.9604644775390625e-8f;
  float s, c;
  sincos_2pi(u2, s, c);
  z_cos = rho * c;
  z_sin = rho * s;
#endif
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

// The Philox words of pair q (elements 2q and 2q + 1).
RELAYOPS_HD Philox4 pair_words(const PhiloxKey& key, uint64_t q) {
  return philox4x32_10(uint32_t(q), uint32_t(q >> 32), key.off0, key.off1, key.k0, key.k1);
}

// The four normals of pair q from its words: eps[2q], eps[2q + 1], eps2[2q], eps2[2q + 1].
template <class A>
RELAYOPS_HD void normals_from_words(const Philox4& w, A& eps_even, A& eps_odd, A& eps2_even, A& eps2_odd) {
  box_muller<A>(w.x0, w.x1, eps_even, eps_odd);
  box_muller<A>(w.x2, w.x3, eps2_even, eps2_odd);
}

// The four normals of pair q: eps[2q], eps[2q + 1], eps2[2q], eps2[2q + 1].
template <class A>
RELAYOPS_HD void normal_quad(const PhiloxKey& key, uint64_t q, A& eps_even, A& eps_odd, A& eps2_even, A& eps2_odd) {
  normals_from_words<A>(pair_words(key, q), eps_even, eps_odd, eps2_even, eps2_odd);
}

// eps[e] and eps2[e] of the single element e (its pair drawn whole, the partner's normals
// dropped): for code that draws element by element; code that draws both elements of a pair
// should call normal_quad once.
template <class A>
RELAYOPS_HD void normal_pair(const PhiloxKey& key, uint64_t e, A& eps, A& eps2) {
  A e0, e1, f0, f1;
  normal_quad<A>(key, e >> 1, e0, e1, f0, f1);
  const bool odd = (e & 1u) != 0;
  eps = odd ? e1 : e0;
  eps2 = odd ? f1 : f0;
}

}  // namespace relayops
