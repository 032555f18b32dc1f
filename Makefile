# The README's commands: `make demo` and `make test`. Everything else is a
# step they call. Each step is idempotent and cheap when there is nothing to do.
SHELL := /bin/bash
PY := .venv/bin/python
BUILD := build
JOBS ?= $(shell nproc)
TORCH_PREFIX = $(shell $(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')
CMAKE_ARGS ?=

.PHONY: env build demo gpt2 test test-cpp test-python consumer test-wheel bench sanitize lint clean

env:
	@scripts/setup_env.sh

$(BUILD)/build.ninja: | env
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_ARGS)

# Installs the C++ package twice: into $(BUILD)/install, and its headers and
# CMake files into the in-tree Python package (whose lib/ the build fills),
# so that pipegear.cmake_prefix_path works there as in a wheel.
build: env $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)
	rm -rf $(BUILD)/install  # no files of an older layout left to be found
	cmake --install $(BUILD) --prefix $(BUILD)/install >/dev/null
	cmake --install $(BUILD) --prefix python/pipegear \
	  --component pipegear_development >/dev/null

demo: build
	$(PY) examples/python/train_mlp.py

# Hugging Face GPT-2 on the standard library's sources, K=2 (docs/gpt2.md).
gpt2: build
	$(PY) examples/python/train_gpt2.py

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure

# The C++ examples are separate CMake projects: built against the installed
# package with find_package(pipegear), then run (the C++17 one's files are
# read back in Python); then the same package copied elsewhere, with torch
# at another path (scripts/test_relocation.sh).
consumer: build
	PYTHON=$(abspath $(PY)) scripts/build_examples.sh $(BUILD)/install "$(TORCH_PREFIX)"
	scripts/test_relocation.sh $(BUILD)/install "$(TORCH_PREFIX)"

# A wheel (pip wheel --no-build-isolation), installed with torch==2.13.0
# into a fresh virtual environment, and a C++ consumer built against it
# through pipegear.cmake_prefix_path. Minutes; not part of `make test`.
test-wheel: build
	PYTHON=$(abspath $(PY)) scripts/test_wheel_consumer.sh

test-python: build
	$(PY) -m pytest -q tests/python

test: test-cpp consumer test-python

# torchgpipe (a baseline of bench_torchgpipe.py only) without its deps: pip
# must never resolve torch itself.
bench: build
	$(PY) -m pip install -q --no-deps torchgpipe==0.0.7
	$(PY) benchmarks/run_all.py $(BENCH)

# ASan + UBSan build of the library and the C++ tests in $(BUILD)-asan (no
# Python module), then every C++ test. `make sanitize SANITIZE=thread`:
# ThreadSanitizer instead, in $(BUILD)-tsan. libtorch is not instrumented;
# the options and the one TSan suppression are explained in
# docs/development.md, "Sanitizers". ASAN_OPTIONS / TSAN_OPTIONS from the
# environment replace the defaults.
sanitize: env
	@set -e; if [ "$(SANITIZE)" = thread ]; then \
	  set -x; \
	  cmake -S . -B $(BUILD)-tsan -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	    -DPIPEGEAR_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DCMAKE_CXX_FLAGS="-fsanitize=thread -fno-omit-frame-pointer" \
	    -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread \
	    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread; \
	  cmake --build $(BUILD)-tsan -j $(JOBS) --target pipegear_tests; \
	  printf 'race:torch::autograd::AutogradMeta::~AutogradMeta\n' \
	    > $(BUILD)-tsan/tsan.supp; \
	  OMP_NUM_THREADS=1 \
	    TSAN_OPTIONS="$${TSAN_OPTIONS:-suppressions=$(abspath $(BUILD))-tsan/tsan.supp second_deadlock_stack=1}" \
	    $(BUILD)-tsan/pipegear_tests; \
	else \
	  set -x; \
	  cmake -S . -B $(BUILD)-asan -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	    -DPIPEGEAR_SANITIZE=ON -DPIPEGEAR_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=Debug; \
	  cmake --build $(BUILD)-asan -j $(JOBS) --target pipegear_tests; \
	  ASAN_OPTIONS="$${ASAN_OPTIONS:-detect_leaks=0:protect_shadow_gap=0}" \
	    UBSAN_OPTIONS="$${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}" \
	    $(BUILD)-asan/pipegear_tests; \
	fi

clean:
	rm -rf $(BUILD) $(BUILD)-asan python/pipegear/*.so* \
	  python/pipegear/lib python/pipegear/include python/pipegear/share
