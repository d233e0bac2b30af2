// kernels.cpp compiled for AVX-512 (with AVX2 and FMA), a translation unit of its own (the builds compile
// in parallel); dispatch.cpp runs it where cpu_isa() is kAvx512. Empty where RELAYOPS_X86 is not
// defined (kernels.h): there the portable build is the only one.
#include "kernels.h"
#if defined(RELAYOPS_X86)
#define RELAYOPS_ISA_AVX512 1
#include "kernels.cpp"
#endif
