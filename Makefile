# The two commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install the pinned environment and the package on first use, then build
# the compiled modules in place (`build`): once, and after that only what changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup build lint toolchain test demo bench gpu-check gpu-check-perf --perf fuzz fault soak install-check clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	RELAYOPS_NO_EXTENSIONS=1 $(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# Build relayops._C and, where nvcc is found, relayops._C_cuda in place (the install above builds
# nothing): the C++ sources compile in parallel, one per core; later runs compile only the
# sources that changed (or include a header that did), and nothing when csrc/ is unchanged.
build: setup
	$(BIN)/python setup.py build_ext --inplace

# ruff (its configuration is in pyproject.toml) before the tests.
lint: setup
	$(BIN)/ruff check .

# The aarch64 cross compiler, qemu-user (runs the aarch64 build of the CPU kernels) and clang for
# the checks of tests/test_cpu_isa.py, each from Debian's registry where apt-get runs as root
# (about a minute together); without one, its tests skip, saying why.
APT_INSTALL = command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get install -y -qq
toolchain:
	@command -v aarch64-linux-gnu-g++ >/dev/null || { $(APT_INSTALL) g++-aarch64-linux-gnu >/dev/null 2>&1; } || \
	  echo "no aarch64 cross compiler: the aarch64 build tests will skip"
	@command -v clang++ >/dev/null || { $(APT_INSTALL) clang >/dev/null 2>&1; } || \
	  echo "no clang: the clang build test will skip"
	@command -v qemu-aarch64 >/dev/null || { $(APT_INSTALL) qemu-user >/dev/null 2>&1; } || \
	  echo "no qemu-aarch64: the aarch64 run test will skip"

# The tests: ruff, the build and the toolchain side by side (apt-get waits on the network and the
# disk while the compiler takes the cores), then pytest on PYTEST_WORKERS processes (pytest-xdist).
# The CUDA module is built here for TEST_CUDA_ARCHS only: the oldest family setup.py supports
# (75, Turing: the pre-Ampere branches of csrc/include) and sm_90 (Hopper: the Ampere-and-later
# branches, and the machine code tests/test_gpu_model.py reads). Every CUDA source still
# compiles, each branch of it at least once, for two families instead of five;
# RELAYOPS_CUDA_ARCHS in the environment wins. `make build`, `make demo`, `make install-check`
# and `make gpu-check` keep setup.py's own list.
TEST_CUDA_ARCHS ?= 75,90
PYTEST_WORKERS ?= 2
test: setup
	$(MAKE) --no-print-directory -j2 lint toolchain build RELAYOPS_CUDA_ARCHS=$${RELAYOPS_CUDA_ARCHS:-$(TEST_CUDA_ARCHS)}
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# Long reliability runs (the CI suite runs bounded versions of each; docs/reliability.md).
# fuzz: hypothesis, FUZZ_EXAMPLES random examples per test (seed SEED), statistics printed.
FUZZ_EXAMPLES ?= 500
SEED ?= 0
fuzz: build
	RELAYOPS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) RELAYOPS_FUZZ_LONG=1 $(BIN)/python -m pytest tests/test_fuzz.py tests/test_loader_fuzz.py \
		-p no:cacheprovider --hypothesis-show-statistics --hypothesis-seed=$(SEED)

# install-check: the packaging test with the CUDA module built too (where nvcc is found): sdist,
# wheel, fresh virtual environment with torch and numpy only (tests/test_install.py).
install-check: setup
	RELAYOPS_TEST_CUDA_BUILD=1 $(BIN)/python -m pytest tests/test_install.py

# fault: FAULT_KILLS SIGKILLs of `relayops train` (a third inside checkpoint writes), restarts,
# bit-exact comparison with an unbroken run.
FAULT_KILLS ?= 20
fault: build
	$(BIN)/python tests/fault_harness.py --kills $(FAULT_KILLS) --seed $(SEED)

# soak: SOAK_CALLS calls of every op (mixed shapes, dtypes, backends) in one process; RSS bounded.
SOAK_CALLS ?= 10000
soak: build
	$(BIN)/python tests/soak.py --calls $(SOAK_CALLS)

# The CUDA module only where it can run: a GPU is visible (setup.py gpu_visible), or
# RELAYOPS_CUDA=1 asks for it.
demo: export RELAYOPS_CUDA ?= gpu
demo: build
	$(BIN)/relayops demo

bench: build
	$(BIN)/python -m pytest bench

# On a machine with an NVIDIA GPU: build for it, run the op matrix on cuda and triton, benchmark,
# torchrun/NCCL smoke run, sampler timing (bench/gpu_check.py). GPU_PYTHON=python3 uses a Python
# that already has a CUDA build of torch instead of the pinned .venv.
# The short-lease mode (bench/gpu_check.py --perf, under 6 minutes): `make gpu-check-perf`, or
# `make gpu-check PERF=1`. GNU make rejects `make gpu-check --perf` itself ("unrecognized option"),
# before it reads this file; `make gpu-check -- --perf` passes --perf on as a goal, which works too.
GPU_PYTHON ?=
PERF ?=
GPU_PERF_FLAG = $(if $(or $(filter --perf,$(MAKECMDGOALS)),$(filter-out 0,$(PERF))),--perf)
gpu-check: $(if $(GPU_PYTHON),,setup)
	$(or $(GPU_PYTHON),$(BIN)/python) bench/gpu_check.py $(GPU_PERF_FLAG) $(GPU_CHECK_ARGS)

gpu-check-perf: $(if $(GPU_PYTHON),,setup)
	$(or $(GPU_PYTHON),$(BIN)/python) bench/gpu_check.py --perf $(GPU_CHECK_ARGS)

# `make gpu-check -- --perf`: the goal --perf only marks the mode (above)
--perf:
	@:

clean:
	rm -rf $(VENV) build *.egg-info
