#pragma once
#include "relayops/args.h"

namespace relayops {
namespace cpu {
// Runs one op on CPU memory. cuda_tiles: emulate the CUDA kernels' thread blocks (tile.h,
// emulate_tiles) instead of the CPU loops; for tests.
void launch(const CallArgs& a, bool cuda_tiles);
// omp_get_max_threads(), or 1 without OpenMP.
int num_threads();
}  // namespace cpu
}  // namespace relayops
