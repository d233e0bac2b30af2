// Shared basics for the CPU and CUDA kernels: the host/device macro, element storage types
// (float16/bfloat16 as raw bits, converted here so that no torch or CUDA half header is needed),
// and strided 4-D views. Header-only; no torch headers anywhere in csrc/.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define RELAYOPS_HD __host__ __device__ __forceinline__
#else
#define RELAYOPS_HD inline
#endif

namespace relayops {

// std:: math overloads work on the host and (for float and double) in CUDA device code.
using std::cos;
using std::exp;
using std::log;
using std::sqrt;

// Largest patch size the compiled kernels handle (local s x s arrays); larger s uses the reference.
constexpr int kMaxS = 16;

struct half_t { uint16_t bits; };      // IEEE binary16
struct bfloat16_t { uint16_t bits; };  // bfloat16

// Data-type codes; relayops._C exposes them (and patch.h's Mode) to Python as enums.
enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Bit casts: CUDA intrinsics on the device; __builtin_bit_cast on the host, where (unlike memcpy)
// GCC still vectorises loops that use it.
RELAYOPS_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(float, u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

RELAYOPS_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#elif defined(__GNUC__) || defined(__clang__)
  return __builtin_bit_cast(uint32_t, f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

// On the device the conversions below are single cvt instructions (same rounding: to nearest
// even, with subnormals and overflow to inf; NaN comes out as the canonical NaN).
RELAYOPS_HD float half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float f = float(m) * 5.9604644775390625e-8f;
    return sign ? -f : f;
  }
  if (e == 31) return bits_to_float(sign | 0x7f800000u | (m << 13));  // inf / nan
  return bits_to_float(sign | ((e + 112u) << 23) | (m << 13));
}

// float -> binary16, round to nearest even, with subnormals, overflow to inf, nan kept.
RELAYOPS_HD uint16_t float_to_half(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {
    // Below 2^-14: adding 0.5 makes the FPU round to a multiple of 2^-24 (the half subnormal
    // step) with round-to-nearest-even; the low bits are then the half's mantissa.
    const float v = bits_to_float(ax) + 0.5f;
    return uint16_t(sign | (float_to_bits(v) - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent (-112 << 23) and round to even
  return uint16_t(sign | (ax >> 13));
}

RELAYOPS_HD float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

RELAYOPS_HD uint16_t float_to_bf16(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet nan
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Loads convert storage to the accumulation type A (float, or double for float64 data).
template <class A> RELAYOPS_HD A load_elem(const float* p) { return A(*p); }
template <class A> RELAYOPS_HD A load_elem(const double* p) { return A(*p); }
template <class A> RELAYOPS_HD A load_elem(const half_t* p) { return A(half_to_float(p->bits)); }
template <class A> RELAYOPS_HD A load_elem(const bfloat16_t* p) { return A(bf16_to_float(p->bits)); }

template <class A> RELAYOPS_HD void store_elem(float* p, A v) { *p = float(v); }
template <class A> RELAYOPS_HD void store_elem(double* p, A v) { *p = double(v); }
template <class A> RELAYOPS_HD void store_elem(half_t* p, A v) { p->bits = float_to_half(float(v)); }
template <class A> RELAYOPS_HD void store_elem(bfloat16_t* p, A v) { p->bits = float_to_bf16(float(v)); }

// A [B, C, H, W] tensor given by its data pointer and element strides (any memory format).
struct View {
  void* ptr;
  int64_t sn, sc, sh, sw;
  RELAYOPS_HD bool present() const { return ptr != nullptr; }
  template <class T>
  RELAYOPS_HD T* at(int64_t b, int64_t c, int64_t h, int64_t w) const {
    return static_cast<T*>(ptr) + b * sn + c * sc + h * sh + w * sw;
  }
};

// Non-negative remainder, for wraparound indices.
RELAYOPS_HD int64_t wrap(int64_t i, int64_t n) {
  const int64_t r = i % n;
  return r < 0 ? r + n : r;
}

// i mod n for i in [-n, 2n): one compare instead of a 64-bit division (the wraparound windows
// reach at most s - 1 <= n - 1 past an image edge).
RELAYOPS_HD int64_t wrap_once(int64_t i, int64_t n) { return i < 0 ? i + n : i >= n ? i - n : i; }

}  // namespace relayops
