#!/usr/bin/env bash
# Installs (once) the Debian packages mp needs to build, test, benchmark and chart.
# Idempotent: it asks apt only for what dpkg says is missing, and runs
# `apt-get update` only when something has to be installed.
set -euo pipefail

packages=(
  build-essential cmake make pkg-config
  libgtest-dev libgmock-dev libbenchmark-dev
  libcereal-dev libssl-dev
  python3 gnuplot-nox
  doxygen                      # `make docs`: the API reference (docs/Doxyfile)
  clang-14 libclang-rt-14-dev  # libFuzzer for tests/fuzz (the `fuzz` preset)
  openmpi-bin libopenmpi-dev   # mp::mpi, the executor over MPI ranks (include/mp/mpi.hpp)
  python3-mpi4py               # the Python side of the MPI benchmarks (W10: mpi4py.futures)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "setup: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
