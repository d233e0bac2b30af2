// Small CUDA entry points beside the op kernels: whether this module holds code the current device
// can run, and Box-Muller of given Philox words (so tests can force the extreme uniforms that
// seeded draws almost never hit). Built with the same -gencode list as kernels.cu.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "checks.h"
#include "relayops/philox.h"

namespace relayops {
namespace cuda {
namespace {

__global__ void probe_kernel() {}

// Pair i's four normals from its words (SPEC 4): eps[2i], eps[2i + 1], eps2[2i], eps2[2i + 1].
template <class A>
__global__ void words_kernel(const uint32_t* w, int64_t n, A* eps, A* eps2) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  relayops::normals_from_words<A>(Philox4{w[i], w[n + i], w[2 * n + i], w[3 * n + i]}, eps[2 * i], eps[2 * i + 1],
                                  eps2[2 * i], eps2[2 * i + 1]);
}

}  // namespace

bool has_kernel_image(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess) return false;
  if (cudaSetDevice(device) != cudaSuccess) return false;
  // Fails with cudaErrorNoKernelImageForDevice (or InvalidDeviceFunction) when the fat binary has
  // neither SASS for this architecture nor PTX the driver can compile for it.
  cudaFuncAttributes attr;
  const bool ok = cudaFuncGetAttributes(&attr, probe_kernel) == cudaSuccess;
  cudaGetLastError();  // a failed lookup leaves a (non-sticky) last error: clear it
  cudaSetDevice(previous);
  return ok;
}

void normals_from_words(const uint32_t* words, int64_t n, int dtype, void* eps, void* eps2, int64_t stream_handle) {
  if (n <= 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  if (dtype == kFloat32)
    words_kernel<float><<<blocks, threads, 0, stream>>>(words, n, static_cast<float*>(eps), static_cast<float*>(eps2));
  else if (dtype == kFloat64)
    words_kernel<double><<<blocks, threads, 0, stream>>>(words, n, static_cast<double*>(eps), static_cast<double*>(eps2));
  else
    throw std::invalid_argument("relayops: normals_from_words takes float32 or float64");
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("relayops CUDA words kernel: ") + cudaGetErrorString(err));
}

}  // namespace cuda
}  // namespace relayops
