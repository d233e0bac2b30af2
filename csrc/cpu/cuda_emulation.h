#pragma once
#include <array>
#include <vector>

#include "relayops/args.h"

namespace relayops {
namespace cpu {
// One global memory access of an emulated CUDA thread: (warp, step, k, lane, address, bytes,
// store). Accesses with the same warp, step and k are one instruction of that warp.
using Access = std::array<int64_t, 7>;
// Runs one op on CPU memory as relayops._C_cuda would on the GPU: the same choice of kernel
// (choose_cuda_path), the same grid, every thread's body (patch_kernels.h, or the tile phases of
// tile.h). Returns the CudaPath taken; with `accesses`, the specialised kernels append every global
// access to it. For tests.
int emulate_cuda(const CallArgs& a, std::vector<Access>* accesses);
}  // namespace cpu
}  // namespace relayops
