# The README's commands: `make demo` and `make test`. Everything else is a
# step they call. Each step is idempotent and cheap when there is nothing to do.
SHELL := /bin/bash
PY := .venv/bin/python
BUILD := build
JOBS ?= $(shell nproc)
TORCH_PREFIX = $(shell $(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')
CMAKE_ARGS ?=

.PHONY: env build demo test test-cpp test-python consumer bench sanitize lint clean

env:
	@scripts/setup_env.sh

$(BUILD)/build.ninja: | env
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_ARGS)

build: env $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)
	cmake --install $(BUILD) --prefix $(BUILD)/install >/dev/null

demo: build
	$(PY) examples/python/train_mlp.py

test-cpp: build
	cd $(BUILD) && ctest --output-on-failure

# The C++ examples are separate CMake projects: built against the installed
# package with find_package(pipegear), then run.
consumer: build
	scripts/build_examples.sh $(BUILD)/install "$(TORCH_PREFIX)"

test-python: build
	$(PY) -m pytest -q tests/python

test: test-cpp consumer test-python

bench: build
	$(PY) benchmarks/run_all.py

sanitize: env
	cmake -S . -B $(BUILD)-asan -G Ninja -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" \
	  -DPIPEGEAR_SANITIZE=ON -DPIPEGEAR_BUILD_PYTHON=OFF -DCMAKE_BUILD_TYPE=Debug
	cmake --build $(BUILD)-asan -j $(JOBS) --target pipegear_tests
	ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(BUILD)-asan/pipegear_tests

clean:
	rm -rf $(BUILD) $(BUILD)-asan python/pipegear/*.so*
