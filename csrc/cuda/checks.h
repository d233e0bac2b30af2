#pragma once
#include <cstdint>

namespace relayops {
namespace cuda {
// True when this module has SASS for `device`'s architecture or PTX its driver can compile.
bool has_kernel_image(int device);
// The four normals of each of n pairs from its Philox words (philox.h normals_from_words) on device
// memory: eps[2i], eps[2i + 1] from w[i], w[n + i]; eps2[2i], eps2[2i + 1] from w[2n + i], w[3n + i];
// eps, eps2 hold 2n values of dtype float32 or float64 (relayops::DType codes); for tests.
void normals_from_words(const uint32_t* words, int64_t n, int dtype, void* eps, void* eps2, int64_t stream);
}  // namespace cuda
}  // namespace relayops
