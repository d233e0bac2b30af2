// CUDA kernels: one thread per s x s patch, running the same per-patch math as the CPU module
// (relayops/patch.h). A thread's relay noise comes from the (2s - 1)^2 window of eps2 its box
// sums read (patch_noise_window), so neighbouring threads redraw shared Philox values instead of
// synchronising; the kernels stay memory-bound. No torch headers: pointers come as integers.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels.h"

namespace relayops {
namespace cuda {
namespace {

template <int S, class T, class A>
__global__ void patch_kernel(const Params<A> P, int64_t total) {
  constexpr int N = S ? S : kMaxS;
  const int n = S ? S : P.s;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t nq = P.W / n, np = P.H / n;
  const int64_t q = idx % nq, p = (idx / nq) % np, c = (idx / (nq * np)) % P.C, b = idx / (nq * np * P.C);
  SampleConsts<S, A> sc;
  sample_consts<S, A>(P, b, sc);
  A nz[N * N];
  if (needs_noise(P)) patch_noise_window<S, T, A>(P, b, c, p, q, nz);
  process_patch<S, T, A>(P, sc, b, c, p, q, nz, N);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("relayops CUDA ") + what + ": " + cudaGetErrorString(err));
}

template <class T, class A>
void run(const Params<A>& P, cudaStream_t stream) {
  const int64_t total = P.B * P.C * (P.H / P.s) * (P.W / P.s);
  if (total == 0) return;
  const int threads = 128;
  const int64_t blocks = (total + threads - 1) / threads;
  switch (P.s) {
    case 2: patch_kernel<2, T, A><<<blocks, threads, 0, stream>>>(P, total); break;
    case 4: patch_kernel<4, T, A><<<blocks, threads, 0, stream>>>(P, total); break;
    case 8: patch_kernel<8, T, A><<<blocks, threads, 0, stream>>>(P, total); break;
    default: patch_kernel<0, T, A><<<blocks, threads, 0, stream>>>(P, total); break;
  }
  check(cudaGetLastError(), "kernel launch");
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
