# The two commands of README.md. Each installs what is missing, configures and builds.
# CI=true (set by .ci/run) builds with warnings as errors.
PRESET ?= $(if $(CI),ci,relwithdebinfo)
BUILD  := build/$(PRESET)
JOBS   ?= $(shell nproc)

.PHONY: all setup configure build demo test bench bench-quick clean

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

bench: setup
	@cmake --preset release >/dev/null && cmake --build build/release -j $(JOBS)
	@python3 bench/run.py --build build/release

bench-quick: setup
	@cmake --preset release >/dev/null && cmake --build build/release -j $(JOBS)
	@python3 bench/run.py --build build/release --quick

clean:
	rm -rf build
