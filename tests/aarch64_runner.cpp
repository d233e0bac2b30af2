// One call of the CPU kernels (csrc/cpu, relayops::cpu::launch) from a file, for
// tests/test_cpu_isa.py: built with the aarch64 cross compiler and run under qemu-aarch64, so the
// portable path's NEON code runs on the same op cases as the x86-64 build.
//
// Input file (little-endian int64 unless said): mode, dtype, s, B, C, H, W; 8 views (x, x0, xp,
// x0p, x0b, eps, eps2, out) of 5 each (region, stride of n, c, h, w); 5 per-sample regions; the
// seeds region; 4 doubles (eta, d_min, alpha, k); seed, offset (uint64); 4 flags; cuda_tiles;
// then the number of regions and, for each, its byte count and bytes. A region number r > 0
// names the r-th region (the pointer the view or parameter had), 0 a null pointer.
// Output file: the bytes of the out view's region after the call.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace {

FILE* in_file;

int64_t next() {
  int64_t v;
  if (std::fread(&v, sizeof v, 1, in_file) != 1) {
    std::fprintf(stderr, "aarch64_runner: input ends early\n");
    std::exit(2);
  }
  return v;
}

double next_double() {
  const int64_t bits = next();
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || !(in_file = std::fopen(argv[1], "rb"))) {
    std::fprintf(stderr, "usage: aarch64_runner INPUT OUTPUT\n");
    return 2;
  }
  relayops::CallArgs a{};
  a.mode = int(next());
  a.dtype = int(next());
  a.s = int(next());
  for (auto& n : a.shape) n = next();
  std::vector<int64_t> view_regions(8);
  a.views.resize(8);
  for (int v = 0; v < 8; ++v) {
    view_regions[v] = next();
    for (int k = 1; k < 5; ++k) a.views[v][k] = next();
  }
  std::vector<int64_t> per_sample_regions(5);
  for (auto& r : per_sample_regions) r = next();
  const int64_t seeds_region = next();
  for (auto& x : a.scalars) x = next_double();
  a.seed = uint64_t(next());
  a.offset = uint64_t(next());
  for (auto& f : a.flags) f = int(next());
  const bool cuda_tiles = next() != 0;

  std::vector<void*> regions(static_cast<size_t>(next()));
  std::vector<int64_t> sizes(regions.size());
  for (size_t r = 0; r < regions.size(); ++r) {
    sizes[r] = next();
    regions[r] = std::aligned_alloc(64, size_t((sizes[r] + 63) / 64 * 64));
    if (std::fread(regions[r], 1, size_t(sizes[r]), in_file) != size_t(sizes[r])) {
      std::fprintf(stderr, "aarch64_runner: region %zu ends early\n", r);
      return 2;
    }
  }
  std::fclose(in_file);
  const auto address = [&](int64_t region) { return region ? int64_t(regions[size_t(region - 1)]) : int64_t(0); };
  for (int v = 0; v < 8; ++v) a.views[v][0] = address(view_regions[v]);
  for (int p = 0; p < 5; ++p) a.per_sample[p] = address(per_sample_regions[p]);
  a.seeds = address(seeds_region);

  relayops::cpu::launch(a, cuda_tiles);

  FILE* out = std::fopen(argv[2], "wb");
  const int64_t out_region = view_regions[7];
  if (!out || !out_region ||
      std::fwrite(regions[size_t(out_region - 1)], 1, size_t(sizes[size_t(out_region - 1)]), out) !=
          size_t(sizes[size_t(out_region - 1)])) {
    std::fprintf(stderr, "aarch64_runner: cannot write the output\n");
    return 2;
  }
  std::fclose(out);
  for (void* p : regions) std::free(p);
  return 0;
}
