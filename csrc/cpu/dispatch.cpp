// The CPU kernels' entry points (kernels.h): the instruction set this CPU runs, capped by
// set_isa_cap, picks one of the builds of kernels.cpp (kernels.h IsaKernels) at every call.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace relayops {
namespace cpu {

// The best instruction set of this CPU (AVX-512 also needs AVX2 and FMA; AVX2 needs FMA).
int best_isa() {
#if defined(RELAYOPS_X86)
  static const int best = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return avx2 && __builtin_cpu_supports("avx512f") ? kAvx512 : avx2 ? kAvx2 : kPortable;
  }();
  return best;
#else
  return kPortable;
#endif
}

namespace {
std::atomic<int> isa_cap{kAvx512};  // read at every kernel call: set_isa_cap takes effect at once

// The build of kernels.cpp for instruction set isa.
const IsaKernels& kernels_for(int isa) {
  switch (isa) {
#if defined(RELAYOPS_X86)
    case kAvx512: return avx512::kernels;
    case kAvx2: return avx2::kernels;
#endif
    default: return portable::kernels;
  }
}

// The build for isa, which the tests' hooks name; an error where this CPU cannot run it.
const IsaKernels& checked_kernels(int isa) {
  if (isa < kPortable || isa > kAvx512) throw std::invalid_argument("relayops: unknown instruction set code");
  if (isa > best_isa()) throw std::invalid_argument("relayops: this CPU lacks the instruction set asked for");
  return kernels_for(isa);
}
}  // namespace

int cpu_isa() { return std::min(best_isa(), isa_cap.load(std::memory_order_relaxed)); }

void set_isa_cap(int cap) {
  if (cap < kPortable || cap > kAvx512) throw std::invalid_argument("relayops: unknown instruction set code");
  isa_cap.store(cap, std::memory_order_relaxed);
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

void launch(const CallArgs& a, bool cuda_tiles) {
  // the tile emulation is built into the portable build only (it stands for the GPU, not this CPU)
  kernels_for(cuda_tiles ? int(kPortable) : cpu_isa()).launch(a, cuda_tiles);
}

void normals_from_words(const uint32_t* w, int64_t n, int dtype, void* eps, void* eps2) {
  if (dtype == kFloat32) {  // the kernels' row code
    kernels_for(cpu_isa()).box_muller_row(w, 0, 2 * n, static_cast<float*>(eps), static_cast<float*>(eps2));
  } else if (dtype == kFloat64) {
    double *e1 = static_cast<double*>(eps), *e2 = static_cast<double*>(eps2);
    for (int64_t i = 0; i < n; ++i)
      relayops::normals_from_words<double>(Philox4{w[i], w[n + i], w[2 * n + i], w[3 * n + i]}, e1[2 * i],
                                           e1[2 * i + 1], e2[2 * i], e2[2 * i + 1]);
  } else {
    throw std::invalid_argument("relayops: normals_from_words takes float32 or float64");
  }
}

void vector_transcendental(int isa, int mode, const uint32_t* in, float* out, int64_t n) {
  if (mode < 0 || mode > 2)
    throw std::invalid_argument("relayops: vector_transcendental mode is 0 (log), 1 (cos) or 2 (sin)");
  checked_kernels(isa).transcendental(mode, in, out, n);
}

void philox_words(int isa, uint64_t seed, uint64_t offset, uint64_t base, int64_t n, uint32_t* w) {
  checked_kernels(isa).philox_row(make_key(seed, offset), base, n, w);
}

}  // namespace cpu
}  // namespace relayops
