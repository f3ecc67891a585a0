# The two commands of README.md. Each installs what is missing, configures and builds.
# CI=true (set by .ci/run) builds with warnings as errors.
PRESET ?= $(if $(CI),ci,relwithdebinfo)
BUILD  := build/$(PRESET)
JOBS   ?= $(shell nproc)

.PHONY: all setup configure build demo test bench bench-quick bench-installed docs clean

all: build

setup:
	@./scripts/setup.sh

configure: setup
	@cmake --preset $(PRESET) >/dev/null

build: configure
	@cmake --build $(BUILD) -j $(JOBS)

demo: build
	@./examples/tour.sh $(BUILD)/examples

test: build
	@ctest --preset $(PRESET)

# Only what run.py runs is built (mp_bench_all: the library and the bench programs), not the tests.
bench: setup
	@cmake --preset release >/dev/null && cmake --build build/release -j $(JOBS) --target mp_bench_all
	@python3 bench/run.py --build build/release

bench-quick: setup
	@cmake --preset release >/dev/null && cmake --build build/release -j $(JOBS) --target mp_bench_all
	@python3 bench/run.py --build build/release --quick

# The same run as a user's program measures it (issue 16): the release library installed into a
# scratch prefix, bench/ built outside the tree as a project of its own with find_package(mp)
# (the installed headers and library only), then run.py on those programs. Report in
# bench/results/installed; BENCH_ARGS passes more (e.g. BENCH_ARGS="--only W1,W2a --reps 3").
INSTALLED_DIR ?= /tmp/mp-bench-installed
bench-installed: setup
	@cmake --preset release >/dev/null
	@cmake --build build/release -j $(JOBS) --target mp $$(cmake --build build/release --target help | grep -o ' mp_mpi$$' || true)
	@rm -rf $(INSTALLED_DIR) && cmake --install build/release --prefix $(INSTALLED_DIR)/prefix >/dev/null
	@cmake -S bench -B $(INSTALLED_DIR)/bench -DCMAKE_PREFIX_PATH=$(INSTALLED_DIR)/prefix -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(INSTALLED_DIR)/bench -j $(JOBS)
	@python3 bench/run.py --build $(INSTALLED_DIR)/bench --out bench/results/installed $(BENCH_ARGS)

# The API reference from the public headers' comments (docs/Doxyfile), in build/docs/html.
# Fails on any Doxygen warning, which is how CI checks the headers' comments.
docs: setup
	@doxygen docs/Doxyfile
	@echo "docs: build/docs/html/index.html"

clean:
	rm -rf build
