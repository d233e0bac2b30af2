// CUDA kernels: one thread block per tile of whole patches of one (b, c) plane, running the phases
// of relayops/tile.h (coalesced loads into shared memory, separable box sums and transforms there,
// coalesced stores) with a barrier between phases. The CPU module emulates the same phases for the
// tests. No torch headers: pointers come as integers.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "relayops/tile.h"

namespace relayops {
namespace cuda {
namespace {

// Blocks of 256 threads per SM the register allocation must allow: the most without spills
// (ptxas -v): 4 (64 registers) with float accumulation, 2 (128) with double.
template <class A>
constexpr int kMinBlocks = sizeof(A) == 8 ? 2 : 4;

template <int S, class T, class A>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks<A>) tile_kernel(const Params<A> P, const TileGeom g) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t blk = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  if (blk >= g.blocks) return;  // the whole block leaves: no barrier is missed
  for (int k = 0; k < g.nsteps; ++k) {
    if (k) __syncthreads();
    tile_phase<S, T, A>(P, g, blk, tile_step(g, k), int(threadIdx.x), smem);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("relayops CUDA ") + what + ": " + cudaGetErrorString(err));
}

template <int S, class T, class A>
void run_tiles(const Params<A>& P, cudaStream_t stream) {
  const TileGeom g = make_tile_geom(P);
  if (g.blocks == 0) return;
  const size_t bytes = size_t(g.smem_elems) * sizeof(A);
  auto kernel = tile_kernel<S, T, A>;
  if (bytes > 48 * 1024) {  // above the default limit: opt in, within what the device allows
    int dev = 0, optin = 0;
    check(cudaGetDevice(&dev), "cudaGetDevice");
    check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "cudaDeviceGetAttribute");
    if (bytes > size_t(optin))
      throw std::runtime_error("relayops CUDA: a tile needs " + std::to_string(bytes) + " bytes of shared memory, the device allows " +
                               std::to_string(optin));
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)), "cudaFuncSetAttribute");
  }
  // A 1-D grid over all tiles; y only past 2^31 - 1 blocks.
  const int64_t max_x = 0x7fffffff;
  const int64_t gx = std::min(g.blocks, max_x), gy = (g.blocks + gx - 1) / gx;
  if (gy > 65535) throw std::runtime_error("relayops CUDA: too many tiles for one launch");
  kernel<<<dim3(unsigned(gx), unsigned(gy)), unsigned(g.threads), bytes, stream>>>(P, g);
  check(cudaGetLastError(), "kernel launch");
}

template <class T, class A>
void run(const Params<A>& P, cudaStream_t stream) {
  with_tile_size(P.s, [&](auto S) { run_tiles<decltype(S)::value, T, A>(P, stream); });
}

}  // namespace

void launch(const CallArgs& a, int64_t stream_handle) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (a.dtype) {
    case kFloat32: return run<float, float>(make_params<float>(a), stream);
    case kFloat64: return run<double, double>(make_params<double>(a), stream);
    case kFloat16: return run<half_t, float>(make_params<float>(a), stream);
    case kBFloat16: return run<bfloat16_t, float>(make_params<float>(a), stream);
    default: throw std::invalid_argument("relayops: unknown dtype code");
  }
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

}  // namespace cuda
}  // namespace relayops
