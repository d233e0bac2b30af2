#pragma once
#include "relayops/args.h"

// The AVX-512 and AVX2 builds of kernels.cpp exist with GCC on x86-64 (best_isa's CPU detection
// and the target pragmas); elsewhere the portable build is the only one.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RELAYOPS_X86 1
#endif

namespace relayops {
namespace cpu {
// Instruction sets of the CPU code paths, in increasing order. kPortable: the build's baseline
// (x86-64: SSE2; aarch64: NEON) with the compiler's vector extensions, no intrinsics.
enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
// The best instruction set this CPU runs; the one the kernels use now (best_isa() capped);
// set_isa_cap caps it (kAvx512: no cap) for every later call, e.g. to test or time each path.
int best_isa();
int cpu_isa();
void set_isa_cap(int cap);
// For the tests: the vector ln u1 (mode 0), cos(2 pi u2) (mode 1) or sin(2 pi u2) (mode 2) of isa
// from n Philox words (SPEC 4).
void vector_transcendental(int isa, int mode, const uint32_t* in, float* out, int64_t n);
// For the tests: the Philox words of isa's row code for the pair indices base .. base + n - 1
// (SPEC 4 counters, wrapping at 2^64): w[k n + i] = word k of pair base + i.
void philox_words(int isa, uint64_t seed, uint64_t offset, uint64_t base, int64_t n, uint32_t* w);
// Runs one op on CPU memory. cuda_tiles: emulate the CUDA kernels' thread blocks (tile.h,
// emulate_tiles) instead of the CPU loops; for tests.
void launch(const CallArgs& a, bool cuda_tiles);
// The four normals of each of n pairs from its Philox words through the kernels' own Box-Muller
// code: eps[2i], eps[2i + 1] (cosine, sine) from w[i], w[n + i]; eps2[2i], eps2[2i + 1] from
// w[2n + i], w[3n + i]; eps, eps2 hold 2n values of dtype float32 or float64. For tests of the
// extreme uniforms.
void normals_from_words(const uint32_t* w, int64_t n, int dtype, void* eps, void* eps2);
// omp_get_max_threads(), or 1 without OpenMP.
int num_threads();

// The entry points of one instruction set's build of kernels.cpp (dispatch.cpp picks the table).
struct IsaKernels {
  // Runs one op; cuda_tiles (the portable build's table only) as in launch above.
  void (*launch)(const CallArgs& a, bool cuda_tiles);
  // The Philox words of pairs base .. base + n - 1, laid out as in philox_words above.
  void (*philox_row)(const PhiloxKey& key, uint64_t base, int64_t n, uint32_t* w);
  // eps, eps2 [W] of a row from the Philox words of its pairs (Box-Muller, float32); first = 1
  // when the row starts with the second element of a pair (vector_rows.h box_muller_row).
  void (*box_muller_row)(const uint32_t* w, int first, int64_t W, float* eps, float* eps2);
  // As vector_transcendental above.
  void (*transcendental)(int mode, const uint32_t* in, float* out, int64_t n);
};
namespace avx512 {
extern const IsaKernels kernels;  // kernels_avx512.cpp (RELAYOPS_X86 only)
}
namespace avx2 {
extern const IsaKernels kernels;  // kernels_avx2.cpp (RELAYOPS_X86 only)
}
namespace portable {
extern const IsaKernels kernels;  // kernels.cpp
}
}  // namespace cpu
}  // namespace relayops
