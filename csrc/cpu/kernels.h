#pragma once
#include "relayops/args.h"

namespace relayops {
namespace cpu {
// Runs one op on CPU memory. cuda_tiles: emulate the CUDA kernels' thread blocks (tile.h,
// emulate_tiles) instead of the CPU loops; for tests.
void launch(const CallArgs& a, bool cuda_tiles);
// eps[i], eps2[i] from the Philox words w[i], w[n + i] and w[2n + i], w[3n + i] through the
// kernels' own Box-Muller code; dtype float32 or float64. For tests of the extreme uniforms.
void normals_from_words(const uint32_t* w, int64_t n, int dtype, void* eps, void* eps2);
// omp_get_max_threads(), or 1 without OpenMP.
int num_threads();
}  // namespace cpu
}  // namespace relayops
