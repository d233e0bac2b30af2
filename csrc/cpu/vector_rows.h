// Row loops written once with the compiler's vector extensions (GCC / Clang) and compiled once per
// instruction set: each build of kernels.cpp includes this file inside its namespace, avx512 and
// avx2 under their `#pragma GCC target` (x86-64 only), portable with the build's own target (SSE2
// on x86-64, NEON on aarch64). kLanes float lanes per vector: 16, 8 or 4. No include guard: included
// once per namespace, after <algorithm>, <cstdint>, <cstring>, <utility>, relayops/philox.h and the
// intrinsics header (<immintrin.h> on x86-64, <arm_neon.h> on aarch64).
//
// Philox4x32-10 (SPEC 4) on kLanes counters per vector: the 32 x 32 -> 64-bit products of the
// even and the odd lanes (x86: mul_epu32; aarch64: umull), their words blended back.
//
// Box-Muller (SPEC 4) per vector of lanes, straight from the Philox words: the series of
// relayops/philox.h's log_unit / sincos_2pi, with the exponent and the sine's and cosine's argument
// reduction taken from the integers, fused multiply-adds, a hardware vector sqrt and a Cody-Waite
// split of e ln 2. One Philox call per pair of elements: lane j's words give the cosine normal of
// element 2j and the sine normal of element 2j + 1, interleaved on the store. Results differ from
// the scalar code by rounding only (tested against float64 libm).

#if !defined(RELAYOPS_VECTOR_BYTES)
#error "define RELAYOPS_VECTOR_BYTES (16, 32 or 64) before including vector_rows.h"
#endif

constexpr int kLanes = RELAYOPS_VECTOR_BYTES / 4;
typedef float VF __attribute__((vector_size(RELAYOPS_VECTOR_BYTES)));
typedef int32_t VI __attribute__((vector_size(RELAYOPS_VECTOR_BYTES)));
typedef uint32_t VU __attribute__((vector_size(RELAYOPS_VECTOR_BYTES)));

// a in every lane: one broadcast (a - 0 is a for every a; a + 0 is not for a = -0, so the
// compiler would add before broadcasting)
inline __attribute__((always_inline)) VF splat(float a) { return a - VF{}; }

// a * b + c, one rounding where the instruction set has FMA.
inline __attribute__((always_inline)) VF fmadd(VF a, VF b, VF c) {
#if RELAYOPS_VECTOR_BYTES == 64
  return _mm512_fmadd_ps(a, b, c);
#elif RELAYOPS_VECTOR_BYTES == 32
  return _mm256_fmadd_ps(a, b, c);
#elif defined(__aarch64__)
  return vfmaq_f32(c, a, b);
#else
  return a * b + c;
#endif
}

inline __attribute__((always_inline)) VF vsqrt(VF a) {
#if RELAYOPS_VECTOR_BYTES == 64
  return _mm512_sqrt_ps(a);
#elif RELAYOPS_VECTOR_BYTES == 32
  return _mm256_sqrt_ps(a);
#elif defined(__aarch64__)
  return vsqrtq_f32(a);
#elif defined(__SSE2__)
  return _mm_sqrt_ps(a);
#else
  VF r;
  for (int i = 0; i < kLanes; ++i) r[i] = std::sqrt(a[i]);
  return r;
#endif
}

// ln u1 for u1 = n 2^-24 with n = (a >> 8) + 1 in [1, 2^24] (SPEC 4), from the word a: n is exact
// in float32, n = 2^e m with m in [sqrt(1/2), sqrt(2)) (the mantissa is halved and e raised by one
// where it exceeds sqrt(2)'s), so ln u1 = (e - 24) ln 2 + ln m; ln m = 2 atanh(z), z = (m - 1) / (m + 1),
// |z| < 0.172 (odd series to z^9, truncation < 1e-9).
inline __attribute__((always_inline)) VF log_u1(VU a) {
  const VU bits = (VU)__builtin_convertvector((VI)((a >> 8) + 1u), VF);
  const VU mant = bits & 0x007fffffu;
  const VU big = (0x003504f3u - mant) >> 31;  // 1 where the mantissa exceeds sqrt(2)'s
  const VF m = (VF)(mant | (0x3f800000u - (big << 23)));
  const VF e = __builtin_convertvector((VI)(bits >> 23) - (127 + 24) + (VI)big, VF);
  const VF z = (m - 1.0f) / (m + 1.0f), z2 = z * z;
  VF p = fmadd(z2, splat(1.0f / 9), splat(1.0f / 7));
  p = fmadd(p, z2, splat(1.0f / 5));
  p = fmadd(p, z2, splat(1.0f / 3));
  const VF series = fmadd((z + z) * z2, p, z + z);
  // e ln 2 = e (ln2_hi + ln2_lo): e ln2_hi is exact (ln2_hi has 11 significant bits, |e| <= 24)
  return fmadd(e, splat(0.693359375f), fmadd(e, splat(-2.12194440e-4f), series));
}

// sin(2 pi u2) and cos(2 pi u2) for u2 = (w >> 8) 2^-24 (SPEC 4), from the word w, reduced in
// integers (exact): r = u2 - round(u2) in [-1/2, 1/2) is (int32(w) >> 8) 2^-24 (the arithmetic
// shift subtracts 2^24 exactly where u2 >= 1/2); a = |r|, b = min(a, 1/2 - a) in [0, 1/4],
// d = min(b, 1/4 - b) in [0, 1/8] (relayops/philox.h sincos_2pi: cos(2 pi b), sin(2 pi b) are
// cos(2 pi d), sin(2 pi d), swapped where b > 1/8; cos(2 pi r) = -cos(2 pi b) where a > 1/4,
// sin(2 pi r) = sign(r) sin(2 pi b)); then the Taylor series in d^2 (cosine to d^10, sine to d^9;
// the first omitted terms are below 2e-10 and 2e-9 at d = 1/8).
inline __attribute__((always_inline)) void sincos_u2(VU w, VF& s, VF& c) {
  const VI r = (VI)w >> 8;  // r 2^24 in [-2^23, 2^23)
  const VI a = r < 0 ? -r : r;
  const VI half_minus_a = 0x800000 - a;
  const VI b = a < half_minus_a ? a : half_minus_a;  // b 2^24 in [0, 2^22]
  const VI swapped = b > 0x200000;                   // all ones where b > 1/8
  const VF d = __builtin_convertvector(swapped ? 0x400000 - b : b, VF) * 5.9604644775390625e-8f;
  const VU cos_flip = (VU)(a > 0x400000) & 0x80000000u;  // the sign bit where folded (a > 1/4)
  const VU sin_flip = (VU)r & 0x80000000u;               // the sign bit of r
  const VF y = d * d;
  constexpr double w1 = 6.283185307179586, w2 = w1 * w1;  // 2 pi, (2 pi)^2
  VF cd = fmadd(splat(float(-w2 * w2 * w2 * w2 * w2 / 3628800.0)), y, splat(float(w2 * w2 * w2 * w2 / 40320.0)));
  cd = fmadd(cd, y, splat(float(-w2 * w2 * w2 / 720.0)));
  cd = fmadd(cd, y, splat(float(w2 * w2 / 24.0)));
  cd = fmadd(cd, y, splat(float(-w2 / 2.0)));
  cd = fmadd(cd, y, splat(1.0f));
  VF sd = fmadd(splat(float(w1 * w2 * w2 * w2 * w2 / 362880.0)), y, splat(float(-w1 * w2 * w2 * w2 / 5040.0)));
  sd = fmadd(sd, y, splat(float(w1 * w2 * w2 / 120.0)));
  sd = fmadd(sd, y, splat(float(-w1 * w2 / 6.0)));
  sd = fmadd(sd, y, splat(float(w1)));
  sd = sd * d;
  c = (VF)((VU)(swapped ? sd : cd) ^ cos_flip);
  s = (VF)((VU)(swapped ? cd : sd) ^ sin_flip);
}

// The two normals sqrt(-2 ln u1) (cos(2 pi u2), sin(2 pi u2)) from the words (a, b).
inline __attribute__((always_inline)) void box_muller(VU a, VU b, VF& z_cos, VF& z_sin) {
  const VF rho = vsqrt(-2.0f * log_u1(a));
  VF s, c;
  sincos_u2(b, s, c);
  z_cos = rho * c;
  z_sin = rho * s;
}

// ---- Philox4x32-10: the rounds of relayops/philox.h, kLanes counters per vector ----
typedef uint64_t VU64 __attribute__((vector_size(RELAYOPS_VECTOR_BYTES)));

// Lanes 2i of a and 2i + 1 of b (one blend).
template <int... i>
inline __attribute__((always_inline)) VU even_odd(VU a, VU b, std::integer_sequence<int, i...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, (i % 2 ? kLanes + i : i)...);
#else
  return __builtin_shuffle(a, b, VI{(i % 2 ? kLanes + i : i)...});
#endif
}

// The 64-bit products of the even lanes of a and m (their low words; the odd lanes are ignored).
inline __attribute__((always_inline)) VU64 mul_even(VU a, VU m) {
#if RELAYOPS_VECTOR_BYTES == 64
  return (VU64)_mm512_mul_epu32((__m512i)a, (__m512i)m);
#elif RELAYOPS_VECTOR_BYTES == 32
  return (VU64)_mm256_mul_epu32((__m256i)a, (__m256i)m);
#elif defined(__SSE2__)
  return (VU64)_mm_mul_epu32((__m128i)a, (__m128i)m);
#else
  return ((VU64)a & 0xffffffffu) * ((VU64)m & 0xffffffffu);
#endif
}

// The high words of a * m per lane (m the same in every lane); lo gets the low words.
inline __attribute__((always_inline)) VU mulhilo(VU a, uint32_t m, VU& lo) {
#if defined(__aarch64__)
  // umull / umull2: the 64-bit products of the low and high lane pairs; uzp splits lo and hi words
  const uint32x4_t v = (uint32x4_t)a;
  const uint32x4_t p0 = vreinterpretq_u32_u64(vmull_n_u32(vget_low_u32(v), m));
  const uint32x4_t p1 = vreinterpretq_u32_u64(vmull_high_n_u32(v, m));
  lo = (VU)vuzp1q_u32(p0, p1);
  return (VU)vuzp2q_u32(p0, p1);
#else
  // even lanes' products, then the odd lanes' (shifted down into the even words)
  const VU mm = VU{} + m;
  const VU even = (VU)mul_even(a, mm), odd = (VU)mul_even((VU)((VU64)a >> 32), mm);
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>{};
  lo = even_odd(even, (VU)((VU64)odd << 32), lanes);
  return even_odd((VU)((VU64)even >> 32), odd, lanes);
#endif
}

// The four Philox words of counters (q, off0, off1) for the pair indices q = base + y + lane,
// y = 0, kLanes, ..., (V - 1) kLanes: c[k][v] is word k of vector v. V vectors in flight: the
// ten rounds are one dependency chain per vector, so interleaving hides the multiply latency.
template <int V>
inline __attribute__((always_inline)) void philox_words(const relayops::PhiloxKey& key, uint64_t base,
                                                        VU (&c)[4][V]) {
  VU iota;
  for (int i = 0; i < kLanes; ++i) iota[i] = uint32_t(i);
  for (int v = 0; v < V; ++v) {
    const uint64_t q = base + uint64_t(v * kLanes);
    c[0][v] = uint32_t(q) + iota;
    c[1][v] = uint32_t(q >> 32) - (VU)(c[0][v] < iota);  // carry where the low word wrapped
    c[2][v] = VU{} + key.off0;
    c[3][v] = VU{} + key.off1;
  }
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int r = 0; r < 10; ++r) {
    for (int v = 0; v < V; ++v) {
      VU lo0, lo1;
      const VU hi0 = mulhilo(c[0][v], 0xD2511F53u, lo0), hi1 = mulhilo(c[2][v], 0xCD9E8D57u, lo1);
      c[0][v] = hi1 ^ c[1][v] ^ k0;
      c[1][v] = lo1;
      c[2][v] = hi0 ^ c[3][v] ^ k1;
      c[3][v] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// n lanes from / to memory, n < kLanes padded with zeros (a whole vector when n == kLanes).
template <class V, class E>
inline __attribute__((always_inline)) V load_lanes(const E* p, int64_t n) {
  V v = V{};
  std::memcpy(&v, p, size_t(n) * sizeof(E));
  return v;
}

template <class V, class E>
inline __attribute__((always_inline)) void store_lanes(E* p, V v, int64_t n) {
  std::memcpy(p, &v, size_t(n) * sizeof(E));
}

// Lanes 0, k, 1, k + 1, ... of (a, b) (k = kLanes): the first half of a and b interleaved (half = 0)
// or the second (half = 1).
template <int half, int... i>
inline __attribute__((always_inline)) VF zip(VF a, VF b, std::integer_sequence<int, i...>) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, (half * kLanes / 2 + i / 2 + (i % 2) * kLanes)...);
#else
  return __builtin_shuffle(a, b, VI{(half * kLanes / 2 + i / 2 + (i % 2) * kLanes)...});
#endif
}

// out[start + i] = v[i] for the i with 0 <= start + i < W.
inline __attribute__((always_inline)) void store_clipped(float* out, int64_t W, int64_t start, VF v) {
  const int64_t i0 = start < 0 ? -start : 0, i1 = W - start < kLanes ? W - start : kLanes;
  if (i1 <= i0) return;
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof(v));
  std::memcpy(out + start + i0, lanes + i0, size_t(i1 - i0) * sizeof(float));
}

// The normals of W elements from the words of their pairs (SPEC 4): the row starts at the second
// element of its first pair when first = 1 (an odd width), so the P = (first + W + 1) / 2 pairs
// hold elements -first .. 2P - first - 1. Pair j's words are w[j], w[P + j], w[2P + j], w[3P + j];
// eps[2j - first] and eps[2j + 1 - first] = box_muller(w[j], w[P + j]) (cosine, sine),
// eps2[...] likewise from (w[2P + j], w[3P + j]), each stored where it lies in [0, W).
inline void box_muller_row(const uint32_t* w, int first, int64_t W, float* eps, float* eps2) {
  const int64_t P = (first + W + 1) / 2;
  constexpr auto lane_ids = std::make_integer_sequence<int, kLanes>{};
  const auto lanes = [&](int64_t j, int64_t n) __attribute__((always_inline)) {
    const VU a = load_lanes<VU>(w + j, n), b = load_lanes<VU>(w + P + j, n);
    const VU c = load_lanes<VU>(w + 2 * P + j, n), d = load_lanes<VU>(w + 3 * P + j, n);
    VF e_cos, e_sin, f_cos, f_sin;
    box_muller(a, b, e_cos, e_sin);
    box_muller(c, d, f_cos, f_sin);
    const VF e_lo = zip<0>(e_cos, e_sin, lane_ids), e_hi = zip<1>(e_cos, e_sin, lane_ids);
    const VF f_lo = zip<0>(f_cos, f_sin, lane_ids), f_hi = zip<1>(f_cos, f_sin, lane_ids);
    const int64_t y = 2 * j - first;
    if (y >= 0 && y + 2 * kLanes <= W) {  // the whole of both vectors lies in the row
      store_lanes(eps + y, e_lo, kLanes);
      store_lanes(eps + y + kLanes, e_hi, kLanes);
      store_lanes(eps2 + y, f_lo, kLanes);
      store_lanes(eps2 + y + kLanes, f_hi, kLanes);
    } else {
      store_clipped(eps, W, y, e_lo);
      store_clipped(eps, W, y + kLanes, e_hi);
      store_clipped(eps2, W, y, f_lo);
      store_clipped(eps2, W, y + kLanes, f_hi);
    }
  };
  int64_t j = 0;
  for (; j + kLanes <= P; j += kLanes) lanes(j, kLanes);  // constant size: plain vector loads
  if (j < P) lanes(j, P - j);
}

// The words of V vectors of pairs base + y, ... stored at w[k W + y + ...]; the last vector
// stores n lanes.
template <int V>
inline __attribute__((always_inline)) void philox_store(const relayops::PhiloxKey& key, uint64_t base, int64_t y,
                                                        int64_t W, int64_t n, uint32_t* w) {
  VU c[4][V];
  philox_words<V>(key, base + uint64_t(y), c);
  for (int v = 0; v < V; ++v)
    for (int k = 0; k < 4; ++k) store_lanes(w + k * W + y + v * kLanes, c[k][v], v == V - 1 ? n : kLanes);
}

// w[k W + y] = Philox word k of counter base + y for y < W (SPEC 4: base + y is a pair index): groups of four vectors, then
// single ones, the last one partial.
inline void philox_row(const relayops::PhiloxKey& key, uint64_t base, int64_t W, uint32_t* w) {
  constexpr int V = 4;
  int64_t y = 0;
  for (; y + V * kLanes <= W; y += V * kLanes) philox_store<V>(key, base, y, W, kLanes, w);
  for (; y < W; y += kLanes) philox_store<1>(key, base, y, W, std::min<int64_t>(W - y, kLanes), w);
}

// For the tests: ln u1 (mode 0), cos(2 pi u2) (mode 1) or sin(2 pi u2) (mode 2) of the uniforms
// of n Philox words.
inline void transcendental(int mode, const uint32_t* in, float* out, int64_t n) {
  for (int64_t y = 0; y < n; y += kLanes) {
    const int64_t k = n - y < kLanes ? n - y : kLanes;
    const VU w = load_lanes<VU>(in + y, k);
    VF s, c;
    sincos_u2(w, s, c);
    store_lanes(out + y, mode == 0 ? log_u1(w) : mode == 1 ? c : s, k);
  }
}

// Fused blur of one patch row of float rows (patch_blur / relay_corrupt; the layout and formula
// of kernels.cpp's BlurRows): t_k = sum_i A[k][i] x_i (column pass, vertical FMAs), then per
// patch out_k[qS + j] = floor x_k[qS + j] + sum_l keep A[j][l] t_k[qS + l] (+ scale nz_k), the row
// pass as one lane permutation per l. in[i], out[i]: the S rows (W floats each, W a multiple of
// S, S dividing kLanes); nz: the noise rows (row stride W) or nullptr; ahead: the offset of the next
// patch row's input from in[i] (0 when there is none), prefetched while this one is read.
// Lane g S + j <- lane g S + l in every group of S lanes: a constant permutation, which the
// compiler turns into an in-lane shuffle with an immediate where it can (no index registers).
template <int S, int l, int... i>
inline __attribute__((always_inline)) VF spread(VF v, std::integer_sequence<int, i...>) {
#if defined(__clang__)
  return __builtin_shufflevector(v, v, (i / S * S + l)...);
#else
  return __builtin_shuffle(v, VI{(i / S * S + l)...});
#endif
}

// r + sum_{l < S} rc[l] * spread_l(t)
template <int S, int l = 0>
inline __attribute__((always_inline)) VF row_pass(VF r, VF t, const VF* rc) {
  if constexpr (l == S) {
    return r;
  } else {
    return row_pass<S, l + 1>(fmadd(rc[l], spread<S, l>(t, std::make_integer_sequence<int, kLanes>{}), r), t, rc);
  }
}

template <int S>
inline void blur_rows(const float* const* in, float* const* out, int64_t W, const float (*A)[S], float keep,
                      float floor, const float* nz, float scale, int64_t ahead) {
  static_assert(kLanes % S == 0, "a vector holds whole patches");
  // Coefficients and row pointers in locals whose address never escapes: the output stores cannot
  // alias them, so they are loaded once, not in every iteration.
  VF ac[S][S];  // column pass: A[k][i] in every lane
  VF rc[S];     // row pass: lane i holds keep A[i % S][l]
  const float* ip[S];
  float* op[S];
  for (int k = 0; k < S; ++k) {
    ip[k] = in[k];
    op[k] = out[k];
    for (int i = 0; i < S; ++i) ac[k][i] = splat(A[k][i]);
  }
  for (int l = 0; l < S; ++l)
    for (int i = 0; i < kLanes; ++i) rc[l][i] = keep * A[i % S][l];
  const VF vfloor = splat(floor), vscale = splat(scale);
  const auto lanes = [&](int64_t y, int64_t n) __attribute__((always_inline)) {
    VF x[S], t[S];
    for (int i = 0; i < S; ++i) x[i] = load_lanes<VF>(ip[i] + y, n);
    for (int k = 0; k < S; ++k) {
      t[k] = ac[k][0] * x[0];
      for (int i = 1; i < S; ++i) t[k] = fmadd(ac[k][i], x[i], t[k]);
    }
    for (int k = 0; k < S; ++k) {
      VF r = vfloor * x[k];
      if (nz) r = fmadd(vscale, load_lanes<VF>(nz + k * W + y, n), r);
      store_lanes(op[k] + y, row_pass<S>(r, t[k], rc), n);
    }
  };
  // A patch row's S input rows are S short streams (W floats each) that end where the next patch
  // row begins: the hardware prefetcher barely ramps up on them (a blur of 128-wide images took
  // 2.6x the time per element of 512-wide ones). So each iteration also asks for the same columns
  // of the next patch row.
  int64_t y = 0;
  for (; y + kLanes <= W; y += kLanes) {
    for (int i = 0; i < S; ++i) __builtin_prefetch(ip[i] + y + ahead);
    lanes(y, kLanes);
  }
  if (y < W) lanes(y, W - y);
}
