#pragma once
#include "relayops/args.h"

namespace relayops {
namespace cpu {
// Runs one op on CPU memory. patchwise: compute noise per patch from its window (the CUDA
// kernels' method) instead of row by row; for tests.
void launch(const CallArgs& a, bool patchwise);
// eps[i], eps2[i] from the Philox words w[i], w[n + i] and w[2n + i], w[3n + i] through the
// kernels' own Box-Muller code; dtype float32 or float64. For tests of the extreme uniforms.
void normals_from_words(const uint32_t* w, int64_t n, int dtype, void* eps, void* eps2);
// omp_get_max_threads(), or 1 without OpenMP.
int num_threads();
}  // namespace cpu
}  // namespace relayops
