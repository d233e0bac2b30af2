// Minimal test helpers for the ctest programs: count failures; main ends with
// `return finish("name");`, exit status 1 if any check failed (never the count itself: a status
// is taken modulo 256, so 256 failures would read as success).
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>

static int g_failures = 0;

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::printf("%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                      \
    }                                                                    \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                                     \
  do {                                                                                            \
    const double va_ = (a), vb_ = (b);                                                            \
    if (!(std::fabs(va_ - vb_) <= (tol))) {                                                       \
      std::printf("%s:%d: CHECK_NEAR failed: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, va_, #b, vb_); \
      ++g_failures;                                                                               \
    }                                                                                             \
  } while (0)

// The exit status of a test program. RELAYOPS_CPP_INJECT_FAILURES=N adds N failing checks first:
// tests/test_compiled_cmake.py uses it to show that a failing check fails the program.
static int finish(const char* name) {
  if (const char* inject = std::getenv("RELAYOPS_CPP_INJECT_FAILURES")) {
    for (long i = std::strtol(inject, nullptr, 10); i > 0; --i) CHECK(!"injected failure");
  }
  std::printf("%s: %d failure(s)\n", name, g_failures);
  return g_failures ? 1 : 0;
}
