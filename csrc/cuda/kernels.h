#pragma once
#include "relayops/args.h"

namespace relayops {
namespace cuda {
// Runs one op on device memory on the given CUDA stream (a cudaStream_t passed as an integer).
void launch(const CallArgs& a, int64_t stream);
// Number of CUDA devices the runtime sees (0 when there is no driver or GPU).
int device_count();
}  // namespace cuda
}  // namespace relayops
