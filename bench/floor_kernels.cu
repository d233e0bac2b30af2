// Minimal sequences behind the instruction floors of docs/gpu-model.md: each kernel does one piece
// of an op's maths and nothing else, in a grid-stride loop whose body `python bench/sass_report.py
// --floors` counts (sm_90 SASS, nvcc -O3). Not part of the library; never launched.
#include <cstdint>

#include "relayops/philox.h"

namespace {

using Words = relayops::Philox4;

// Philox4x32-10 (SPEC 4), the library's own rounds: key (k0, k1), counter (c0, c1, c2, c3).
__device__ __forceinline__ Words philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  return relayops::philox4x32_10(c0, c1, c2, c3, k0, k1);
}

// ln(u) for u = k 2^-24, k in [1, 2^24] (never 0, never subnormal): u = 2^e (1 + m) with
// 1 + m in [sqrt(1/2), sqrt(2)), ln(1 + m) = m p(m), p of degree 7 fitted on Chebyshev nodes
// (relative error below 2e-7). Accurate relative to ln(u) near u = 1, which the hardware log2
// (absolute error ~2^-22) is not: r = sqrt(-2 ln u) is small there.
__device__ __forceinline__ float ln_unit(float u) {
  const uint32_t b = __float_as_uint(u);
  const uint32_t big = (0x003504f3u - (b & 0x007fffffu)) >> 31;
  const float m = __uint_as_float((b & 0x007fffffu) | (0x3f800000u - (big << 23))) - 1.0f;
  const float e = float(int32_t(b >> 23) - 127 + int32_t(big));
  float p = -0.10134057f;
  p = fmaf(p, m, 0.16234189f); p = fmaf(p, m, -0.17247014f); p = fmaf(p, m, 0.19898565f);
  p = fmaf(p, m, -0.24970071f); p = fmaf(p, m, 0.33335114f); p = fmaf(p, m, -0.50000364f);
  p = fmaf(p, m, 0.99999994f);
  return fmaf(e, 0.69314718f, p * m);
}

__device__ __forceinline__ float radius(uint32_t a) {
  const float u1 = fmaf(float(a >> 8), 5.9604644775390625e-8f, 5.9604644775390625e-8f);  // (0, 1]
  float r;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(r) : "f"(-2.0f * ln_unit(u1)));
  return r;
}

// The turn t - 1/2 in [-1/2, 1/2): the hardware sine and cosine are accurate there; the half
// turn is a sign, folded into the radius.
__device__ __forceinline__ float turn(uint32_t b) { return fmaf(float(b >> 8), 5.9604644775390625e-8f, -0.5f); }

// Revised scheme: both Box-Muller outputs of a pair, (r cos 2 pi t, r sin 2 pi t).
__device__ __forceinline__ void box_muller_pair(uint32_t a, uint32_t b, float& c, float& s) {
  const float r = -radius(a);
  float sn, cs;
  __sincosf(6.2831853071795865f * turn(b), &sn, &cs);
  c = r * cs;
  s = r * sn;
}

// Original scheme: the cosine output only.
__device__ __forceinline__ float box_muller_cos(uint32_t a, uint32_t b) {
  return -radius(a) * __cosf(6.2831853071795865f * turn(b));
}

// DCT-II of 4 values (orthonormal, SPEC 1): butterflies with constant coefficients.
__device__ __forceinline__ void dct4(float a, float b, float c, float d, float& y0, float& y1, float& y2, float& y3) {
  const float c0 = 0.5f, c1 = 0.65328148243818826f, c3 = 0.27059805007309849f;
  const float s03 = a + d, s12 = b + c, d03 = a - d, d12 = b - c;
  y0 = c0 * (s03 + s12);
  y2 = c0 * (s03 - s12);
  y1 = c1 * d03 + c3 * d12;
  y3 = c3 * d03 - c1 * d12;
}

}  // namespace

// One Philox call per iteration (its four words stored): 1 "element" = 1 call.
extern "C" __global__ void floor_philox(uint4* out, uint32_t k0, uint32_t k1, uint32_t o0, uint32_t o1, int n) {
  for (int q = blockIdx.x * blockDim.x + threadIdx.x; q < n; q += gridDim.x * blockDim.x) {
    const Words w = philox(q, 0, o0, o1, k0, k1);
    out[q] = make_uint4(w.x0, w.x1, w.x2, w.x3);
  }
}

// Revised scheme: eps and eps2 of 4 elements per iteration (two Philox calls, four pairs).
extern "C" __global__ void floor_normals_revised(float4* eps, float4* eps2, uint32_t k0, uint32_t k1, uint32_t o0,
                                                 uint32_t o1, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const Words a = philox(2 * i, 0, o0, o1, k0, k1), b = philox(2 * i + 1, 0, o0, o1, k0, k1);
    float4 e, f;
    box_muller_pair(a.x0, a.x1, e.x, e.y);
    box_muller_pair(a.x2, a.x3, f.x, f.y);
    box_muller_pair(b.x0, b.x1, e.z, e.w);
    box_muller_pair(b.x2, b.x3, f.z, f.w);
    eps[i] = e;
    eps2[i] = f;
  }
}

// Original scheme: eps and eps2 of 4 elements per iteration (four Philox calls, eight cosines).
extern "C" __global__ void floor_normals_original(float4* eps, float4* eps2, uint32_t k0, uint32_t k1, uint32_t o0,
                                              uint32_t o1, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    float e[4], f[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const Words w = philox(4 * i + j, 0, o0, o1, k0, k1);
      e[j] = box_muller_cos(w.x0, w.x1);
      f[j] = box_muller_cos(w.x2, w.x3);
    }
    eps[i] = make_float4(e[0], e[1], e[2], e[3]);
    eps2[i] = make_float4(f[0], f[1], f[2], f[3]);
  }
}

// patch_dct of one 4 x 4 float32 patch per iteration (16 elements): 128-bit rows in and out.
extern "C" __global__ void floor_patch_dct(const float4* x, float4* y, int wp, int npatch) {
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < npatch; p += gridDim.x * blockDim.x) {
    const int pr = p / wp, pc = p - pr * wp;
    const float4* src = x + 4 * pr * wp + pc;
    const float4 r0 = src[0], r1 = src[wp], r2 = src[2 * wp], r3 = src[3 * wp];
    float4 t0, t1, t2, t3, u0, u1, u2, u3;
    dct4(r0.x, r0.y, r0.z, r0.w, t0.x, t0.y, t0.z, t0.w);
    dct4(r1.x, r1.y, r1.z, r1.w, t1.x, t1.y, t1.z, t1.w);
    dct4(r2.x, r2.y, r2.z, r2.w, t2.x, t2.y, t2.z, t2.w);
    dct4(r3.x, r3.y, r3.z, r3.w, t3.x, t3.y, t3.z, t3.w);
    dct4(t0.x, t1.x, t2.x, t3.x, u0.x, u1.x, u2.x, u3.x);
    dct4(t0.y, t1.y, t2.y, t3.y, u0.y, u1.y, u2.y, u3.y);
    dct4(t0.z, t1.z, t2.z, t3.z, u0.z, u1.z, u2.z, u3.z);
    dct4(t0.w, t1.w, t2.w, t3.w, u0.w, u1.w, u2.w, u3.w);
    float4* dst = y + 4 * pr * wp + pc;
    dst[0] = u0; dst[wp] = u1; dst[2 * wp] = u2; dst[3 * wp] = u3;
  }
}

// A copy, 4 elements per iteration: the loop and addressing overhead alone.
extern "C" __global__ void floor_copy(const float4* x, float4* y, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = x[i];
}
