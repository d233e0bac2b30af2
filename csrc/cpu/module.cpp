// pybind11 module relayops._C: the CPU kernels, and the op-mode and dtype codes that both compiled
// modules take (Python reads them from here, never from a copy). Arguments are plain integers and
// floats (data pointers and element strides from tensor.data_ptr()/stride()); see
// relayops/ops/_compiled.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cuda_emulation.h"
#include "kernels.h"

namespace py = pybind11;
using relayops::CallArgs;

PYBIND11_MODULE(_C, m) {
  m.doc() = "relayops compiled CPU kernels (no torch headers; pointers passed as integers)";
  py::enum_<relayops::Mode>(m, "Mode", "which op a kernel call runs")
      .value("patch_dct", relayops::kDct)
      .value("patch_idct", relayops::kIdct)
      .value("patch_blur", relayops::kBlur)
      .value("relay_noise", relayops::kNoise)
      .value("relay_corrupt", relayops::kCorrupt)
      .value("relay_step", relayops::kStep);
  py::enum_<relayops::DType>(m, "DType", "storage dtype of the image tensors")
      .value("float32", relayops::kFloat32)
      .value("float64", relayops::kFloat64)
      .value("float16", relayops::kFloat16)
      .value("bfloat16", relayops::kBFloat16);
  py::enum_<relayops::cpu::Isa>(m, "Isa", "instruction sets of the CPU code paths, in increasing order")
      .value("portable", relayops::cpu::kPortable)
      .value("avx2", relayops::cpu::kAvx2)
      .value("avx512", relayops::cpu::kAvx512);
  m.def("best_isa", &relayops::cpu::best_isa, "the best instruction set this CPU runs (an Isa code)");
  m.def("cpu_isa", &relayops::cpu::cpu_isa, "the instruction set the kernels use now: best_isa() capped");
  m.def("set_isa_cap", &relayops::cpu::set_isa_cap, py::arg("cap"),
        "cap the instruction set of every later kernel call (Isa.avx512: no cap)");
  m.def(
      "vector_transcendental",
      [](int isa, int mode, int64_t in, int64_t out, int64_t n) {
        relayops::cpu::vector_transcendental(isa, mode, reinterpret_cast<const uint32_t*>(in),
                                             reinterpret_cast<float*>(out), n);
      },
      py::arg("isa"), py::arg("mode"), py::arg("input"), py::arg("out"), py::arg("n"),
      "For tests: the vector ln u1 (mode 0), cos(2 pi u2) (mode 1) or sin(2 pi u2) (mode 2) of instruction set isa "
      "from n Philox words");
  m.def(
      "philox_words",
      [](int isa, uint64_t seed, uint64_t offset, uint64_t base, int64_t n, int64_t out) {
        relayops::cpu::philox_words(isa, seed, offset, base, n, reinterpret_cast<uint32_t*>(out));
      },
      py::arg("isa"), py::arg("seed"), py::arg("offset"), py::arg("base"), py::arg("n"), py::arg("out"),
      "For tests: the Philox words [4, n] (uint32) of instruction set isa for pair indices base .. base + n - 1");
  m.def(
      "run",
      [](int mode, int dtype, int s, std::array<int64_t, 4> shape, std::vector<relayops::ViewArg> views,
         std::array<int64_t, 5> per_sample, int64_t seeds, std::array<double, 4> scalars, uint64_t seed,
         uint64_t offset, std::array<int, 4> flags, bool cuda_tiles) {
        CallArgs a{mode, dtype, s, shape, std::move(views), per_sample, seeds, scalars, seed, offset, flags};
        py::gil_scoped_release release;
        relayops::cpu::launch(a, cuda_tiles);
      },
      py::arg("mode"), py::arg("dtype"), py::arg("s"), py::arg("shape"), py::arg("views"), py::arg("per_sample"),
      py::arg("seeds"), py::arg("scalars"), py::arg("seed"), py::arg("offset"), py::arg("flags"),
      py::arg("cuda_tiles") = false,
      "Run one op on CPU tensors; cuda_tiles emulates the CUDA kernels' thread blocks (for tests).");
  m.def(
      "emulate_cuda",
      [](int mode, int dtype, int s, std::array<int64_t, 4> shape, std::vector<relayops::ViewArg> views,
         std::array<int64_t, 5> per_sample, int64_t seeds, std::array<double, 4> scalars, uint64_t seed,
         uint64_t offset, std::array<int, 4> flags, bool record) {
        CallArgs a{mode, dtype, s, shape, std::move(views), per_sample, seeds, scalars, seed, offset, flags};
        std::vector<relayops::cpu::Access> accesses;
        int path;
        {
          py::gil_scoped_release release;
          path = relayops::cpu::emulate_cuda(a, record ? &accesses : nullptr);
        }
        return py::make_tuple(path, accesses);
      },
      py::arg("mode"), py::arg("dtype"), py::arg("s"), py::arg("shape"), py::arg("views"), py::arg("per_sample"),
      py::arg("seeds"), py::arg("scalars"), py::arg("seed"), py::arg("offset"), py::arg("flags"), py::arg("record"),
      "For tests: run one op on CPU tensors as relayops._C_cuda would on a GPU (its choice of kernel, "
      "every thread of its grid); returns (path: 0 tiles, 1 patch kernels, 2 block-noise kernel, accesses: "
      "(warp, step, k, lane, address, bytes, store) of the specialised kernels' global accesses when record)");
  m.def(
      "normals_from_words",
      [](int64_t words, int64_t n, int dtype, int64_t eps, int64_t eps2) {
        relayops::cpu::normals_from_words(reinterpret_cast<const uint32_t*>(words), n, dtype,
                                          reinterpret_cast<void*>(eps), reinterpret_cast<void*>(eps2));
      },
      py::arg("words"), py::arg("n"), py::arg("dtype"), py::arg("eps"), py::arg("eps2"),
      "Box-Muller of given Philox words [4, n] (uint32, n pairs) into eps, eps2 [2n]; for tests");
  m.def("num_threads", &relayops::cpu::num_threads, "OpenMP threads the kernels use (follows torch.set_num_threads when torch shares libgomp)");
  m.attr("max_s") = relayops::kMaxS;
}
