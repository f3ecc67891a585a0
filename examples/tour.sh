#!/usr/bin/env bash
# The `make demo` tour: runs every example in order and says what to look for in its output.
# Usage: examples/tour.sh BUILD_DIR/examples
# Exits non-zero when an example fails, runs longer than 60 s, or leaves a process behind.
set -uo pipefail

dir=${1:?usage: $0 BUILD_DIR/examples}
if [ ! -d "$dir" ]; then
  echo "tour: no such directory: $dir (build first: make build)" >&2
  exit 2
fi
dir=$(cd "$dir" && pwd)

bold=; dim=; reset=
if [ -t 1 ]; then bold=$'\e[1m'; dim=$'\e[2m'; reset=$'\e[0m'; fi

failed=()
n=0

# A process still running the example's binary after it returned is a leaked child. The fork
# server may need a moment to notice that its parent is gone, hence the short grace period.
leftovers() {
  local exe=$1 i
  for i in $(seq 20); do
    pgrep -f -- "^$exe( |\$)" >/dev/null || return 1
    sleep 0.1
  done
  pgrep -a -f -- "^$exe( |\$)"
  return 0
}

run() {
  local name=$1 what=$2 exe="$dir/$1" rc
  n=$((n + 1))
  echo
  echo "${bold}== $n. $name${reset}"
  echo "${dim}   look for: $what${reset}"
  if [ ! -x "$exe" ]; then
    echo "tour: $exe is missing" >&2
    failed+=("$name (missing)")
    return
  fi
  # timeout puts the example in its own process group and signals the whole group on expiry.
  timeout 60 ${launch:-} "$exe"
  rc=$?
  if [ $rc -eq 124 ]; then
    echo "tour: $name did not finish within 60 s" >&2
    failed+=("$name (timeout)")
  elif [ $rc -ne 0 ]; then
    echo "tour: $name exited with $rc" >&2
    failed+=("$name (exit $rc)")
  fi
  if leftovers "$exe"; then
    echo "tour: $name left the processes above behind" >&2
    failed+=("$name (left a process)")
  fi
}

run 01_target_args \
  "the parent prints 主 at once; each child prints 'piao end' 1-3 s later, in no fixed order"
run 02_subclass \
  "the same, from a Process subclass whose run() the child calls: 主 first, the ends 1-3 s later"
run 03_memory_isolation \
  "the child sets the global n to 0 and prints 0; after join the parent still prints 100"
run 04_start_then_join \
  "ten children sleep 0.15-1.5 s side by side: elapsed is about 1.5 s (the longest), not 8.25 s (the sum)"
run 05_daemon \
  "the daemon ticks until 'main-------', then stops; the worker still prints end456 about 1 s later"
run 06_pid_ppid \
  "the child's getppid() is the parent's pid; exitcode None before the end, 0 after join, -15 after terminate()"
run 07_forkserver \
  "children come from the fork server (their getppid() is not main); exit codes 0 0 0 3 1, and 'Process failing:' with the exception on stderr"
run 08_async_callback \
  "four workers print 'is running'; each 'handle res N' comes from a callback as its result arrives, in no fixed order; 主 last, after shutdown"
run 09_sync_submit \
  "submit(...).result() one at a time: 'is running' then its result, alternating, in input order 0 1 4 9 16; about 1 s in all"
run 10_worker_crash \
  "fragile(13) segfaults its worker: that line shows mp::WorkerDied (signal 11, SIGSEGV), the other 19 results print, and the pool runs one more task"
run 11_pool \
  "Pool map in order, imap_unordered (sorted), five apply_async callbacks 100..104, then close/join"
run 12_task_timeout \
  "the 5 s task is killed at its 300 ms limit: mp::TimeoutError naming the killed worker; the quick task and the next one still succeed"
run 13_listener_client \
  "an intruder with a wrong key is refused on both sides (AuthenticationError); three workers authenticate and share nine 'downloads', each URL reported once; all stop"
run 14_threading_tcp_server \
  "two clients at once: each receives hello, then hello2 about 0.2 s later (a thread per connection); shutdown, then server_close joins the handler threads. Then a service with an idle client gets SIGTERM: it exits with code 0 at its 300 ms deadline, the idle client disconnected"
run 15_manager_dict \
  "four processes add 100, 200, 300 and 400 to one manager dict under a manager Lock: total = 1000, no update lost"
run 16_remote_manager \
  "a manager served on 127.0.0.1 with an authkey: the client process adds to the server's Tally; reset() is not exposed (RemoteError); a wrong key is refused (AuthenticationError)"
run 18_python_workers \
  "python3 puts eight dict jobs on an mp manager's queue; three C++ worker processes square them; python prints each result with the C++ worker's pid, then everything stops"
# mp::mpi's example exists only when CMake found MPI; it runs as 3 ranks under mpirun (Open MPI
# wants --oversubscribe past the core count, and its two variables to run as root).
if [ -x "$dir/17_mpi_map" ] && command -v mpirun >/dev/null; then
  launch="mpirun -n 3"
  if mpirun --version 2>/dev/null | grep -q "Open MPI"; then
    launch="mpirun --oversubscribe -n 3"
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
  run 17_mpi_map \
    "mpirun -n 3: rank 0 maps count_primes over 40 blocks; 148933 primes, the blocks counted by ranks 1 and 2 (rank 0 only hands out work)"
  launch=
fi

echo
if [ ${#failed[@]} -ne 0 ]; then
  echo "${bold}tour: ${#failed[@]} of $n examples failed: ${failed[*]}${reset}" >&2
  exit 1
fi
echo "${bold}tour: all $n examples ran and left no process behind${reset}"
