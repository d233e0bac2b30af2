#pragma once
#include "relayops/args.h"

namespace relayops {
namespace cpu {
// Runs one op on CPU memory. patchwise: compute noise per patch from its window (the CUDA
// kernels' method) instead of row by row; for tests.
void launch(const CallArgs& a, bool patchwise);
// omp_get_max_threads(), or 1 without OpenMP.
int num_threads();
}  // namespace cpu
}  // namespace relayops
