# The two commands of README.md. Each installs what is missing, configures and builds.
# CI=true (set by .ci/run) builds with warnings as errors.
PRESET ?= $(if $(CI),ci,relwithdebinfo)
BUILD  := build/$(PRESET)
JOBS   ?= $(shell nproc)

.PHONY: all setup configure build demo test bench bench-quick docs clean

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

# The API reference from the public headers' comments (docs/Doxyfile), in build/docs/html.
# Fails on any Doxygen warning, which is how CI checks the headers' comments.
docs: setup
	@doxygen docs/Doxyfile
	@echo "docs: build/docs/html/index.html"

clean:
	rm -rf build
