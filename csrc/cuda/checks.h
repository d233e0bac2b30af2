#pragma once
#include <cstdint>

namespace relayops {
namespace cuda {
// True when this module has SASS for `device`'s architecture or PTX its driver can compile.
bool has_kernel_image(int device);
// eps[i] = box_muller(w[i], w[n + i]), eps2[i] = box_muller(w[2n + i], w[3n + i]) (philox.h) on
// device memory, dtype float32 or float64 (relayops::DType codes); for tests.
void normals_from_words(const uint32_t* words, int64_t n, int dtype, void* eps, void* eps2, int64_t stream);
}  // namespace cuda
}  // namespace relayops
