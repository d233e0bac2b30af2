// CUDA kernels. Every op takes one specialised kernel (relayops/patch_kernels.h: a thread per
// patch, per column strip for block noise, or per patch column for the noise ops, in registers,
// vector loads and stores) where choose_cuda_path allows; everything else (strided layouts,
// misaligned data, s = 1 and s > 8, odd s for the noise ops, very large inputs) runs the tile
// kernel: one thread block per tile of whole patches of one (b, c) plane, running the phases
// of relayops/tile.h (coalesced loads into shared memory, separable box sums and transforms there,
// coalesced stores) with a barrier between phases. The CPU module emulates both for the tests
// (csrc/cpu/cuda_emulation.cpp). No torch headers: pointers come as integers.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "relayops/patch_kernels.h"
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

// ---- The specialised kernels: thin wrappers of the per-thread bodies of patch_kernels.h ----
// The explicit minimum of one block per SM keeps the register limit at 255 but changes ptxas's
// heuristics: without it, some block-noise instantiations spill a few values at 32-72 registers.

template <int S, class T>
__global__ void __launch_bounds__(kFastThreads, 1) patch_dct_kernel(const PatchArgs<T, acc_t<T>> a) {
  patch_thread<PatchOp::kDct, S>(GlobalMemory{}, a, int(blockIdx.x * blockDim.x + threadIdx.x),
                                 int(blockIdx.y * blockDim.y + threadIdx.y), int(blockIdx.z));
}

template <int S, class T>
__global__ void __launch_bounds__(kFastThreads, 1) patch_idct_kernel(const PatchArgs<T, acc_t<T>> a) {
  patch_thread<PatchOp::kIdct, S>(GlobalMemory{}, a, int(blockIdx.x * blockDim.x + threadIdx.x),
                                  int(blockIdx.y * blockDim.y + threadIdx.y), int(blockIdx.z));
}

template <int S, class T>
__global__ void __launch_bounds__(kFastThreads, 1) patch_blur_kernel(const PatchArgs<T, acc_t<T>> a) {
  patch_thread<PatchOp::kBlur, S>(GlobalMemory{}, a, int(blockIdx.x * blockDim.x + threadIdx.x),
                                  int(blockIdx.y * blockDim.y + threadIdx.y), int(blockIdx.z));
}

template <int S, class T, bool Adjoint>
__global__ void __launch_bounds__(kFastThreads, 1) block_noise_kernel(const BoxArgs<T, acc_t<T>> a) {
  DeviceWarp w{int(blockIdx.x * blockDim.x + threadIdx.x), int(blockIdx.y * blockDim.y + threadIdx.y),
               int(blockIdx.z)};
  block_noise_warp<S, Adjoint>(a, w);
}

// The noise ops: relay_warp of patch_kernels.h, one kernel per op (and relay_step variant).
#define RELAYOPS_RELAY_KERNEL(name, op)                                                                  \
  template <int S, class T>                                                                            \
  __global__ void __launch_bounds__(kFastThreads, 1) name(const RelayArgs<T, acc_t<T>> a) {             \
    DeviceWarp w{int(blockIdx.x * blockDim.x + threadIdx.x), int(blockIdx.y * blockDim.y + threadIdx.y), \
                 int(blockIdx.z)};                                                                      \
    relay_warp<op, S>(a, w);                                                                            \
  }
RELAYOPS_RELAY_KERNEL(relay_noise_kernel, RelayOp::kNoise)
RELAYOPS_RELAY_KERNEL(relay_corrupt_kernel, RelayOp::kCorrupt)
RELAYOPS_RELAY_KERNEL(relay_step_euler_kernel, RelayOp::kEuler)
RELAYOPS_RELAY_KERNEL(relay_step_heun_kernel, RelayOp::kHeun)
RELAYOPS_RELAY_KERNEL(relay_step_second_kernel, RelayOp::kSecond)
#undef RELAYOPS_RELAY_KERNEL

template <class Args>
void launch_fast(void (*kernel)(Args), const LaunchShape& ls, const Args& a, cudaStream_t stream) {
  if (ls.grid.x == 0 || ls.grid.y == 0 || ls.grid.z == 0) return;
  kernel<<<dim3(unsigned(ls.grid.x), unsigned(ls.grid.y), unsigned(ls.grid.z)),
           dim3(unsigned(ls.block.x), unsigned(ls.block.y)), 0, stream>>>(a);
  check(cudaGetLastError(), "kernel launch");
}

template <int S, class T, class A>
void run_patch(const Params<A>& P, cudaStream_t stream) {
  const PatchArgs<T, A> a = make_patch_args<T>(P);
  const LaunchShape ls = patch_launch_shape(a.npc, a.npr, P.B * P.C);
  switch (P.mode) {
    case kDct: return launch_fast(patch_dct_kernel<S, T>, ls, a, stream);
    case kIdct: return launch_fast(patch_idct_kernel<S, T>, ls, a, stream);
    default: return launch_fast(patch_blur_kernel<S, T>, ls, a, stream);
  }
}

template <int S, class T, class A>
void run_box(const Params<A>& P, cudaStream_t stream) {
  if constexpr (box_kernel_exists<A>(S)) {  // else choose_cuda_path never picks this path
    const BoxArgs<T, A> a = make_box_args<T>(P);
    const LaunchShape ls = box_launch_shape(a, P.B * P.C);
    if (P.shift)
      launch_fast(block_noise_kernel<S, T, true>, ls, a, stream);
    else
      launch_fast(block_noise_kernel<S, T, false>, ls, a, stream);
  }
}

// Only the kernels relay_kernel_exists names are built; choose_cuda_path picks no other.
template <int S, class T, class A>
void run_relay(const Params<A>& P, cudaStream_t stream) {
  const RelayArgs<T, A> a = make_relay_args<T>(P);
  const LaunchShape ls = relay_launch_shape(a, P.B * P.C);
  switch (relay_op(P)) {
    case RelayOp::kNoise:
      if constexpr (relay_kernel_exists<A>(RelayOp::kNoise, S)) launch_fast(relay_noise_kernel<S, T>, ls, a, stream);
      return;
    case RelayOp::kCorrupt:
      if constexpr (relay_kernel_exists<A>(RelayOp::kCorrupt, S))
        launch_fast(relay_corrupt_kernel<S, T>, ls, a, stream);
      return;
    case RelayOp::kEuler:
      if constexpr (relay_kernel_exists<A>(RelayOp::kEuler, S))
        launch_fast(relay_step_euler_kernel<S, T>, ls, a, stream);
      return;
    case RelayOp::kHeun:
      if constexpr (relay_kernel_exists<A>(RelayOp::kHeun, S)) launch_fast(relay_step_heun_kernel<S, T>, ls, a, stream);
      return;
    case RelayOp::kSecond:
      if constexpr (relay_kernel_exists<A>(RelayOp::kSecond, S))
        launch_fast(relay_step_second_kernel<S, T>, ls, a, stream);
      return;
  }
}

template <class T, class A>
void run(const Params<A>& P, cudaStream_t stream) {
  switch (choose_cuda_path<T>(P)) {
    case kPathPatch: return with_fast_size(P.s, [&](auto S) { run_patch<decltype(S)::value, T>(P, stream); });
    case kPathBox: return with_fast_size(P.s, [&](auto S) { run_box<decltype(S)::value, T>(P, stream); });
    case kPathRelay: return with_fast_size(P.s, [&](auto S) { run_relay<decltype(S)::value, T>(P, stream); });
    default: return with_tile_size(P.s, [&](auto S) { run_tiles<decltype(S)::value, T, A>(P, stream); });
  }
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
