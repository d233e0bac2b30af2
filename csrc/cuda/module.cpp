// pybind11 module relayops._C_cuda: the CUDA kernels (built with nvcc when it is found). Same
// arguments as relayops._C.run (whose Mode and DType enums give the codes) plus the CUDA stream
// handle as an integer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "checks.h"
#include "kernels.h"

namespace py = pybind11;
using relayops::CallArgs;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "relayops compiled CUDA kernels (no torch headers; pointers and stream passed as integers)";
  m.def(
      "run",
      [](int mode, int dtype, int s, std::array<int64_t, 4> shape, std::vector<relayops::ViewArg> views,
         std::array<int64_t, 5> per_sample, int64_t seeds, std::array<double, 4> scalars, uint64_t seed,
         uint64_t offset, std::array<int, 4> flags, int64_t stream) {
        CallArgs a{mode, dtype, s, shape, std::move(views), per_sample, seeds, scalars, seed, offset, flags};
        relayops::cuda::launch(a, stream);
      },
      py::arg("mode"), py::arg("dtype"), py::arg("s"), py::arg("shape"), py::arg("views"), py::arg("per_sample"),
      py::arg("seeds"), py::arg("scalars"), py::arg("seed"), py::arg("offset"), py::arg("flags"), py::arg("stream"));
  m.def("device_count", &relayops::cuda::device_count);
  m.def("has_kernel_image", &relayops::cuda::has_kernel_image, py::arg("device"),
        "True when this module has machine code or PTX that CUDA device `device` can run");
  m.def(
      "normals_from_words",
      [](int64_t words, int64_t n, int dtype, int64_t eps, int64_t eps2, int64_t stream) {
        relayops::cuda::normals_from_words(reinterpret_cast<const uint32_t*>(words), n, dtype,
                                           reinterpret_cast<void*>(eps), reinterpret_cast<void*>(eps2), stream);
      },
      py::arg("words"), py::arg("n"), py::arg("dtype"), py::arg("eps"), py::arg("eps2"), py::arg("stream"),
      "Box-Muller of given Philox words [4, n] (uint32, n pairs) into eps, eps2 [2n]; for tests");
#ifdef RELAYOPS_CUDA_ARCHS
  m.attr("archs") = RELAYOPS_CUDA_ARCHS;  // the architectures it was built for, e.g. "75,80,90"
#endif
  m.attr("max_s") = relayops::kMaxS;
}
