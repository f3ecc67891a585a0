#!/usr/bin/env python3
"""mp versus Python's multiprocessing versus the machine's limit, in one table.

    python3 bench/run.py --build build/release            # full run (make bench)
    python3 bench/run.py --build build/release --quick    # seconds (make bench-quick, CI)

For each repetition, for each workload, it runs the mp side (<build>/bench/mp_workloads), the
Python side (bench/python/workloads.py) and the limit (<build>/bench/mp_limits), each as its own
process with a timeout, so that drift hits all three alike and a hung side cannot hang the run.
Then it runs the Google Benchmark microbenchmarks (<build>/bench/mp_bench) and writes
    bench/results/latest.json   every raw value
    bench/results/latest.md     medians, ratios, sizes and the machine
    bench/results/ratios.png    a bar chart of the ratios (gnuplot)

Exit status: 0 when every side ran (an mp side that does not exist yet is "n/a", not a failure);
1 when a side crashed, failed its own check, printed no result, or timed out; 2 on bad usage.
Speed is never judged. Standard library only.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

HIGHER, LOWER = "higher", "lower"

# The workloads. Sizes are the source of truth: run.py passes --size to every side. `cpp` is the
# size of the mp and limit sides, `py` the Python side's (smaller where full size would make the
# run long; the value is a rate or a time per operation, so it stays comparable), `quick` is
# --quick for all three. `size_unit` says what a size counts. `limit_target` is the share of the
# limit mp must reach (issue 16: e.g. W7 <= 1.5x the limit's time is a share of 1 / 1.5); the
# chart marks it.
WORKLOADS = [
    dict(id="W1", title="start + join a child running an empty function, in sequence",
         unit="us", per="per start+join", better=LOWER,
         cpp=200, py=200, quick=20, size_unit="starts",
         limit_target=1 / 1.2),
    # W1 again, against the smallest C program that does it (libc only, built apart from
    # mp_limits, which links libcrypto: what a program loads makes each of its forks dearer), and
    # from the smallest mp program (mp_start_min: mp::Process only; mp_workloads links every
    # workload). Every side runs W1 (`same_as`); the mp side is `mp_exe`, the limit `limit_exe`;
    # there is no Python side.
    dict(id="W1-c", title="W1 in the smallest mp program vs a minimal C program (fork + _exit + "
         "waitpid, libc only)",
         unit="us", per="per start+join", better=LOWER, same_as="W1",
         mp_exe="mp_start_min", limit_exe="mp_limit_fork", no_python=True,
         cpp=200, py=200, quick=20, size_unit="starts",
         limit_target=1 / 1.2),
    # W1-cxx: W1-c's limit program with the C++ runtime loaded (libstdc++, libm, libgcc_s), so
    # that the part of W1-c's gap any C++ program pays is told from what mp adds. No target.
    dict(id="W1-cxx", title="W1 in the smallest mp program vs the minimal C program with the C++ "
         "runtime loaded (libstdc++, libm, libgcc_s)",
         unit="us", per="per start+join", better=LOWER, same_as="W1",
         mp_exe="mp_start_min", limit_exe="mp_limit_fork_cxx", no_python=True,
         cpp=200, py=200, quick=20, size_unit="starts"),
    # W1-c-static: W1-c with the C++ runtime linked into the smallest mp program
    # (-static-libstdc++ -static-libgcc: 25 mappings instead of 40, the C program has 23), to
    # tell whether dropping the shared C++ runtime closes W1-c's gap. No target (a program's
    # link is its own choice). n/a where libmp is a shared library.
    dict(id="W1-c-static", title="W1-c with the C++ runtime linked into the smallest mp program "
         "(-static-libstdc++ -static-libgcc) vs the minimal C program",
         unit="us", per="per start+join", better=LOWER, same_as="W1",
         mp_exe="mp_start_min_static", limit_exe="mp_limit_fork", no_python=True,
         cpp=200, py=200, quick=20, size_unit="starts"),
    # W1b: start + join from a parent with 2 GiB of touched heap, whose bare fork copies the
    # page tables of all of it; mp's forkserver and spawn need not. Target: <= 0.05x the bare
    # fork's time (a share of 20). W1b-small: the forkserver from a small parent, against a bare
    # fork of a small parent (<= 1.2x). No Python side (its forkserver preloads differently, and
    # a 2 GiB Python parent would make the run long). `pass_quick`: --quick goes to the sides
    # too, and shrinks the parent's heap to 64 MiB (CI runners may not have 2 GiB to spare).
    dict(id="W1b", title="W1 from a parent with 2 GiB of touched heap: forkserver vs bare fork",
         unit="us", per="per start+join", better=LOWER, no_python=True,
         cpp=5, py=5, quick=2, size_unit="starts", pass_quick=True,
         limit_target=20),
    dict(id="W1b-spawn", title="W1 from a parent with 2 GiB of touched heap: spawn vs bare fork",
         unit="us", per="per start+join", better=LOWER, no_python=True,
         cpp=5, py=5, quick=2, size_unit="starts", pass_quick=True,
         limit_target=20),
    dict(id="W1b-small", title="W1 with the forkserver from a small parent (the smallest mp "
         "program) vs a bare fork",
         unit="us", per="per start+join", better=LOWER, no_python=True, mp_exe="mp_start_min",
         cpp=200, py=200, quick=20, size_unit="starts",
         limit_target=1 / 1.2),
    # W1b-small's mp side again, against the smallest forkserver in C (limits/fork_min.c):
    # what any forkserver costs beyond a bare fork (a request to another process, the pid and
    # the status back) is in both sides, so this row shows what mp's own adds. No target.
    dict(id="W1b-small-fs", title="W1b-small vs a minimal C forkserver (request, fork, pid back, "
         "status back; libc only)",
         unit="us", per="per start+join", better=LOWER, same_as="W1b-small", no_python=True,
         mp_exe="mp_start_min", limit_exe="mp_limit_fork",
         cpp=200, py=200, quick=20, size_unit="starts"),
    dict(id="W2a", title="x*x on 2 workers: submit + result per task, in order",
         unit="tasks/s", per="", better=HIGHER,
         cpp=100_000, py=20_000, quick=2_000, size_unit="tasks"),
    dict(id="W2a-steady", title="W2a on a pool that already ran three such batches",
         unit="tasks/s", per="", better=HIGHER,
         cpp=100_000, py=20_000, quick=2_000, size_unit="tasks"),
    dict(id="W2b", title="x*x on 2 workers: map with chunks of 1,000, in order",
         unit="tasks/s", per="", better=HIGHER,
         cpp=100_000, py=100_000, quick=10_000, size_unit="tasks"),
    dict(id="W3", title="64 CPU-bound 20 ms tasks on 2 workers: serial / (2 x parallel)",
         unit="efficiency", per="", better=HIGHER,
         cpp=64, py=64, quick=8, size_unit="tasks"),
    dict(id="W4", title="producer to consumer process, 64-byte messages",
         unit="msgs/s", per="", better=HIGHER,
         cpp=1_000_000, py=200_000, quick=20_000, size_unit="msgs",
         limit_target=0.6),
    dict(id="W5", title="producer to consumer process, 1 MiB messages (MB = 10^6 bytes)",
         unit="MB/s", per="", better=HIGHER,
         cpp=1024, py=1024, quick=16, size_unit="MiB"),
    dict(id="W6-pipe", title="8-byte round trip between two processes over a Pipe",
         unit="us", per="per round trip", better=LOWER,
         cpp=100_000, py=100_000, quick=2_000, size_unit="round trips",
         limit_target=1 / 1.1),
    dict(id="W6-pipe-oneway", title="8-byte round trip between two processes over two one-way Pipes",
         unit="us", per="per round trip", better=LOWER,
         cpp=100_000, py=100_000, quick=2_000, size_unit="round trips"),
    dict(id="W6-queue", title="8-byte round trip between two processes over Queues",
         unit="us", per="per round trip", better=LOWER,
         cpp=100_000, py=20_000, quick=2_000, size_unit="round trips"),
    dict(id="W7", title="2 processes (one per CPU) x lock / increment / unlock a shared counter",
         unit="ns", per="per increment", better=LOWER,
         cpp=1_000_000, py=200_000, quick=20_000, size_unit="increments per process",
         limit_target=1 / 1.5),
    # W7's mp side again, against the same bare mutex with a waiter that spins before it sleeps
    # as mp's does (limits.cpp, SpinFutexMutex): W7's limit sleeps at once, so mp can beat it by
    # spinning; this row shows what mp's lock costs beyond the same policy. No target.
    dict(id="W7-spin", title="W7 vs the same bare mutex with mp's spin before sleeping",
         unit="ns", per="per increment", better=LOWER, same_as="W7", limit_as="W7-spin",
         no_python=True,
         cpp=1_000_000, py=200_000, quick=20_000, size_unit="increments per process"),
    dict(id="W8a", title="Listener/Client (authkey) on 127.0.0.1, one connection per request",
         unit="requests/s", per="", better=HIGHER,
         cpp=3000, py=3000, quick=200, size_unit="ms"),
    dict(id="W8b", title="Listener/Client (authkey) on 127.0.0.1, round trips on one connection",
         unit="us", per="per round trip", better=LOWER,
         cpp=20_000, py=20_000, quick=1_000, size_unit="round trips"),
    dict(id="W9", title="manager dict: set + get from a child process (1 op = 1 set or 1 get)",
         unit="ops/s", per="", better=HIGHER,
         cpp=20_000, py=20_000, quick=1_000, size_unit="set+get pairs"),
    # W12a: the same Python client (workloads.py W12a-client) against a C++ peer (mp side) and a
    # Python peer (Python side); W12a-decode: py::loads<std::map> against pickle.loads of the
    # same bytes, each in its own process, in the same run; W12a-decode-flat: the same into a
    # vector of pairs.
    dict(id="W12a", title="Python's conn.send of a dict of 10 str -> int, the peer answers conn.send "
         "of a list: C++ peer vs Python peer", unit="round trips/s", per="", better=HIGHER,
         cpp=20_000, py=20_000, quick=1_000, size_unit="round trips"),
    dict(id="W12a-decode", title="decode one W12a message: py::loads<std::map<std::string, int64_t>> "
         "vs pickle.loads", unit="ns", per="per decode", better=LOWER,
         cpp=200_000, py=200_000, quick=10_000, size_unit="decodes"),
    dict(id="W12a-decode-flat", title="decode one W12a message: py::loads<std::vector<std::pair<"
         "std::string, int64_t>>> vs pickle.loads", unit="ns", per="per decode", better=LOWER,
         cpp=200_000, py=200_000, quick=10_000, size_unit="decodes"),
    dict(id="W12b", title="a Python client's dict proxy: set + get (1 op = 1 set or 1 get), "
         "mp manager vs Python's SyncManager", unit="ops/s", per="", better=HIGHER,
         cpp=20_000, py=20_000, quick=1_000, size_unit="set+get pairs"),
    # Over MPI: mp and Python (mpi4py.futures) run under `mpirun -n 3` (2 worker ranks). Their
    # Limit column is no machine limit but the local pool doing the same work (`limit_as`: the mp
    # side of W2a / W2b), so "mp vs limit" is the share of the local pool's rate kept over MPI.
    dict(id="W10a", title="over MPI, 3 ranks: x*x, submit + result per task, in order",
         unit="tasks/s", per="", better=HIGHER, mpi=True, limit_as="W2a",
         cpp=100_000, py=20_000, quick=2_000, size_unit="tasks"),
    dict(id="W10b", title="over MPI, 3 ranks: x*x, map with chunks of 1,000, in order",
         unit="tasks/s", per="", better=HIGHER, mpi=True, limit_as="W2b",
         cpp=100_000, py=100_000, quick=10_000, size_unit="tasks"),
]

# Reference rows: a limit only (what one process can do at all), shown under the table.
REFERENCES = [
    dict(id="memcpy", title="memcpy of 1 MiB blocks in one process (a ceiling for W5)",
         unit="MB/s", better=HIGHER, cpp=1024, quick=16, size_unit="MiB"),
]

SIDES = ("mp", "python", "limit")


# ---- running one side ----------------------------------------------------------------------------

class Outcome:
    """One run of one side: a value, or a status saying why there is none."""

    def __init__(self, status, value=None, record=None, detail=""):
        self.status = status  # "ok", "n/a", "timeout", "error", "missing"
        self.value = value
        self.record = record or {}
        self.detail = detail

    def to_json(self):
        d = {"status": self.status, "value": self.value}
        if self.detail:
            d["detail"] = self.detail
        return d


def kill_group(pgid):
    # Each side runs in its own session, so its process group holds every process it forked
    # (pool workers, a manager, a server): one signal ends them all, and nothing left behind can
    # hold our stdout pipe open.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_side(argv, timeout, workload):
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True, text=True,
                                cwd=ROOT)
    except OSError as e:
        return Outcome("error", detail=f"cannot start {argv[0]}: {e}")
    # Drain both pipes in threads and wait for the side's main process, not for end of file: a
    # process it left behind may hold the pipes open.
    captured = {}

    def drain(name, f):
        captured[name] = f.read()

    readers = [threading.Thread(target=drain, args=("out", proc.stdout), daemon=True),
               threading.Thread(target=drain, args=("err", proc.stderr), daemon=True)]
    for t in readers:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    kill_group(proc.pid)  # a hung side, or what a finished side left behind
    proc.wait()
    for t in readers:
        t.join(timeout=10)
    out, err = captured.get("out", ""), captured.get("err", "")
    if timed_out:
        return Outcome("timeout", detail=f"no result within {timeout:g} s")
    if proc.returncode != 0:
        tail = " | ".join((err or "").strip().splitlines()[-3:])
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        return Outcome("error", detail=f"{how}: {tail}")
    record = None
    for line in reversed((out or "").strip().splitlines()):
        try:
            record = json.loads(line)
            break
        except ValueError:
            continue
    if not isinstance(record, dict) or record.get("workload") != workload:
        return Outcome("error", detail=f"no JSON result line for {workload} on stdout")
    value = record.get("value")
    if value is None:
        return Outcome("n/a", record=record)
    if not isinstance(value, (int, float)):
        return Outcome("error", detail=f"bad value {value!r}")
    return Outcome("ok", float(value), record)


class Sides:
    """Where each side's program is, and how to call it for a workload."""

    def __init__(self, build, workdir):
        # A build of the whole tree keeps the programs in bench/; bench/ built as a project of
        # its own against an installed mp (make bench-installed) keeps them at its top.
        bench = build / "bench" if (build / "bench" / "mp_workloads").exists() else build
        self.mp = bench / "mp_workloads"
        self.limits = bench / "mp_limits"
        self.micro = bench / "mp_bench"
        self.extra_limits = {"mp_limit_fork": bench / "mp_limit_fork",
                             "mp_limit_fork_cxx": bench / "mp_limit_fork_cxx"}
        self.extra_mp = {"mp_start_min": bench / "mp_start_min",
                         "mp_start_min_static": bench / "mp_start_min_static"}
        self.python = [sys.executable, str(HERE / "python" / "workloads.py")]
        self.notes = []
        if not self.mp.exists():
            self.notes.append(f"{self.mp} not found: every mp value is n/a "
                              "(build with MP_BUILD_BENCH=ON)")
            self.mp = None
        if not self.limits.exists():
            self.limits = self.build_limits(workdir)
        if self.micro.exists() is False:
            self.notes.append(f"{self.micro} not found: no microbenchmarks")
            self.micro = None
        self.find_mpi(bench)

    def find_mpi(self, bench):
        # W10: mp::mpi's program and mpi4py.futures, both under mpirun -n 3.
        self.mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
        self.mp_mpi = bench / "mp_mpi_workloads"
        self.mpi_python = None
        self.timeout = 120.0
        if self.mpirun is None:
            self.notes.append("no mpirun: the W10 rows are n/a")
            return
        self.mpirun = [self.mpirun, "-n", "3"]
        version = subprocess.run([self.mpirun[0], "--version"], capture_output=True,
                                 text=True).stdout
        if "Open MPI" in version:
            # More ranks than cores, and root (CI): Open MPI refuses both unless told.
            self.mpirun.insert(1, "--oversubscribe")
            os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        if not self.mp_mpi.exists():
            self.notes.append(f"{self.mp_mpi} not found (mp built without MPI): mp's W10 is n/a")
            self.mp_mpi = None
        # mpi4py may be installed for the system's Python only (Debian's python3-mpi4py).
        for py in dict.fromkeys([sys.executable, "/usr/bin/python3"]):
            if py and Path(py).exists() and subprocess.run(
                    [py, "-c", "import mpi4py.futures"], capture_output=True).returncode == 0:
                self.mpi_python = py
                break
        if self.mpi_python is None:
            self.notes.append("mpi4py not importable (apt install python3-mpi4py): Python's W10 "
                              "is n/a")
        elif self.mpi_python != sys.executable:
            self.notes.append(f"W10's Python side runs {self.mpi_python} (it has mpi4py)")

    def expected(self, side, w):
        """The workload id the side's JSON line names (a Limit column borrowed from another
        workload's mp side names that workload)."""
        if side == "limit" and w.get("limit_as"):
            return w["limit_as"]
        return w.get("same_as", w["id"])

    def mpi_argv(self, side, wid, size):
        under = ["timeout", "-k", "5", f"{max(self.timeout - 5, 1):g}"]
        if side == "mp":
            if self.mpirun is None or self.mp_mpi is None:
                return None
            return under + self.mpirun + [str(self.mp_mpi), wid, "--size", str(size)]
        if self.mpirun is None or self.mpi_python is None:
            # The Python side itself says n/a (mpi4py missing).
            return self.python + [wid, "--size", str(size)]
        return under + self.mpirun + [self.mpi_python, "-m", "mpi4py.futures",
                                      str(HERE / "python" / "workloads.py"), wid, "--size",
                                      str(size)]

    def build_limits(self, workdir):
        # Without a CMake build (e.g. while developing the runner) compile the limits program
        # alone: it uses no mp.
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        exe = workdir / "mp_limits"
        src = HERE / "limits" / "limits.cpp"
        if cxx is None:
            sys.exit("run.py: no mp_limits in the build and no C++ compiler to build it")
        subprocess.run([cxx, "-std=c++20", "-O2", "-o", str(exe), str(src)], check=True)
        self.notes.append(f"mp_limits built standalone with {cxx} -O2 (not found in the build)")
        return exe

    def argv(self, side, wid, size, w=None):
        if w is not None:
            wid = w.get("same_as", wid)
            if side == "python" and w.get("no_python"):
                return None
            if side == "limit" and w.get("limit_exe"):
                exe = self.extra_limits.get(w["limit_exe"])
                return [str(exe), wid, "--size", str(size)] if exe and exe.exists() else None
            if side == "mp" and w.get("mp_exe"):
                exe = self.extra_mp.get(w["mp_exe"])
                return [str(exe), wid, "--size", str(size)] if exe and exe.exists() else None
        if w is not None and w.get("mpi"):
            if side == "limit":
                return None if self.mp is None else [str(self.mp), w["limit_as"], "--size",
                                                     str(size)]
            return self.mpi_argv(side, wid, size)
        if side == "mp":
            return None if self.mp is None else [str(self.mp), wid, "--size", str(size)]
        if side == "python":
            return self.python + [wid, "--size", str(size)]
        if w is not None and w.get("limit_as"):
            wid = w["limit_as"]
        return [str(self.limits), wid, "--size", str(size)]


# ---- the microbenchmarks -------------------------------------------------------------------------

def run_micro(sides, quick, timeout):
    if sides.micro is None:
        return None
    args = [str(sides.micro), "--benchmark_format=json",
            "--benchmark_enable_random_interleaving=true"]
    if quick:
        args += ["--benchmark_min_time=0.05", "--benchmark_repetitions=1"]
    else:
        args += ["--benchmark_min_time=0.5", "--benchmark_repetitions=5"]
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL, start_new_session=True)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "benchmarks": []}
    if p.returncode != 0:
        return {"status": "error", "detail": p.stderr.strip()[-500:], "benchmarks": []}
    try:
        data = json.loads(p.stdout)
    except ValueError:
        return {"status": "error", "detail": "bad JSON from mp_bench", "benchmarks": []}
    # One row per benchmark: the median aggregate when there are repetitions, else the only run;
    # iterations are those of one repetition.
    rows = {}
    for b in data.get("benchmarks", []):
        name = (b.get("run_name") or b["name"]).replace("/real_time", "").replace(
            "/manual_time", "")
        row = rows.setdefault(name, {"name": name, "runs": []})
        if b.get("error_occurred"):
            row["error"] = b.get("error_message", "error")
            continue
        agg = b.get("aggregate_name")
        if not agg:
            row["runs"].append(b["real_time"])
            row.setdefault("iterations", b.get("iterations"))
            row.setdefault("time", b["real_time"])
            row["time_unit"] = b.get("time_unit", "ns")
        elif agg == "median":
            row["time"] = b["real_time"]
    return {"status": "ok", "benchmarks": list(rows.values()),
            "repetitions": 1 if quick else 5, "context": data.get("context", {})}


# ---- the machine ---------------------------------------------------------------------------------

def machine_info(sides):
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    compiler = "unknown"
    for exe in (sides.mp, sides.limits):
        if exe is None:
            continue
        try:
            compiler = json.loads(subprocess.run([str(exe), "info"], capture_output=True,
                                                 text=True, timeout=10).stdout)["compiler"]
            break
        except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
            continue
    commit = ""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += " (with uncommitted changes)"
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cpu": cpu,
        "cores": f"{os.cpu_count()} online, {usable} usable",
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "compiler": compiler,
        "python": f"CPython {platform.python_version()}",
        "commit": commit or "unknown",
    }


def machine_state(sides):
    """What a page fault, a system call and a bare fork cost right now (mp_limit_fork probe), or
    None. On a VM they follow the host: the W1 rows (which fork) follow them."""
    exe = sides.extra_limits.get("mp_limit_fork")
    if exe is None or not Path(exe).exists():
        return None
    try:
        out = subprocess.run([str(exe), "probe"], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def describe_state(state):
    if not state:
        return "not measured"
    return (f"first write to a fresh page {state['fault_us']:.3g} us, a system call (getpid) "
            f"{state['syscall_us']:.3g} us, fork + _exit + waitpid of a C program "
            f"{state['fork_us']:.4g} us")


class OtherLoad:
    """CPU time that programs other than this run used while it ran, from /proc/stat minus our
    own and our children's CPU time: a busy machine makes every number noisy, so say so."""

    def __init__(self):
        self.t0 = self._now()

    @staticmethod
    def _now():
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
            busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            r = resource.getrusage(who)
            ours += r.ru_utime + r.ru_stime
        return busy, ours, time.monotonic()

    def cpus(self):
        t1 = self._now()
        if self.t0 is None or t1 is None or t1[2] <= self.t0[2]:
            return None
        other = (t1[0] - self.t0[0]) - (t1[1] - self.t0[1])
        return max(0.0, other / (t1[2] - self.t0[2]))


# ---- numbers and ratios --------------------------------------------------------------------------

def summarize(outcomes):
    """Median of the good values, with what went wrong in the others."""
    values = [o.value for o in outcomes if o.status == "ok"]
    counts = {}
    for o in outcomes:
        if o.status != "ok":
            counts[o.status] = counts.get(o.status, 0) + 1
    median = statistics.median(values) if values else None
    return {"median": median, "n": len(values), "runs": len(outcomes), "problems": counts,
            "min": min(values) if values else None, "max": max(values) if values else None}


def oriented(mp, other, better):
    """How many times better mp is than `other` (>1: mp better), whatever the unit's direction."""
    if mp is None or other is None or mp <= 0 or other <= 0:
        return None
    return mp / other if better == HIGHER else other / mp


def fmt_num(v):
    if v is None:
        return ""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.3g}"


def fmt_cell(summary, unit):
    if summary["n"] == 0:
        probs = summary["problems"]
        if not probs:
            return "n/a"
        if set(probs) == {"n/a"}:
            return "n/a"
        return " / ".join(sorted(k for k in probs if k != "n/a")) or "n/a"
    text = f"{fmt_num(summary['median'])} {unit}"
    bad = {k: v for k, v in summary["problems"].items() if k != "n/a"}
    if bad:
        text += " (" + ", ".join(f"{v} {k}" for k, v in sorted(bad.items())) + ")"
    return text


def fmt_ratio(r, percent=False):
    if r is None:
        return "—"
    if percent:
        return f"{r * 100:.3g}%" if r < 10 else f"{r:.3g}x"
    return f"{r:.3g}x"


# ---- the report ----------------------------------------------------------------------------------

def write_markdown(path, results, refs, micro, machine, config, chart_ok):
    L = []
    L.append("# mp benchmarks: mp vs Python multiprocessing vs the machine's limit")
    L.append("")
    mode = "QUICK mode: tiny sizes, for CI only; these numbers mean nothing" if config["quick"] \
        else "full run"
    L.append(f"{config['date']} · {mode} · median of {config['reps']} repetition(s), "
             "interleaved (each repetition runs every workload's mp, Python and limit side "
             "in turn)")
    L.append("")
    busy = config.get("other_load_cpus") or 0.0
    if busy > 0.2:
        L.append(f"**Warning: other programs used {busy:.1f} of the {os.cpu_count()} CPUs on "
                 "average during this run; these numbers are noisier and slower than on an idle "
                 "machine.**")
        L.append("")
    L.append("**How to read it.** *Better* says whether a higher or a lower value is better for "
             "that row. Both ratios are oriented so that **higher is better for mp**, whatever "
             "the unit: **mp vs Python** is how many times faster mp is than Python (2x: twice "
             "as fast; 0.5x: half as fast); **mp vs limit** is the share of the machine's limit "
             "that mp reaches (100%: at the limit). `n/a`: mp has no such primitive yet.")
    L.append("")
    L.append("| Workload | Better | mp | Python | Limit | mp vs Python (x faster) "
             "| mp vs limit (% of limit) | Size mp & limit / Python |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in results:
        w = r["workload"]
        s = r["summary"]
        size = (f"{w['cpp_size']:,} / {w['py_size']:,} {w['size_unit']}"
                if w["cpp_size"] != w["py_size"] else f"{w['cpp_size']:,} {w['size_unit']}")
        unit = w["unit"] + (f" {w['per']}" if w.get("per") else "")
        L.append(f"| **{w['id']}** {w['title']} | {w['better']} | {fmt_cell(s['mp'], unit)} | "
                 f"{fmt_cell(s['python'], unit)} | {fmt_cell(s['limit'], unit)} | "
                 f"{fmt_ratio(r['vs_python'])} | {fmt_ratio(r['vs_limit'], percent=True)} | "
                 f"{size} |")
    L.append("")
    for ref in refs:
        w = ref["workload"]
        L.append(f"Reference: {w['title']}: {fmt_cell(ref['summary'], w['unit'])} "
                 f"({w['cpp_size']:,} {w['size_unit']}).")
    L.append("")
    if chart_ok:
        L.append("![mp vs Python and vs the limit, per workload (log scale)](ratios.png)")
        L.append("")

    L.append("## What each side runs")
    L.append("")
    L.append("| Workload | mp | Python | Limit |")
    L.append("|---|---|---|---|")
    for r in results:
        m = r["methods"]
        L.append(f"| {r['workload']['id']} | {m.get('mp', '')} | {m.get('python', '')} | "
                 f"{m.get('limit', '')} |")
    L.append("")
    L.append("Python runs with the fork start method everywhere; pools are warmed up before "
             "timing. Python sizes smaller than the C++ ones are marked in the Size column; every "
             "value is a rate or a time per operation, so the sizes stay comparable. Limits wait "
             "on shared memory with a short spin, then a futex; W8a's limit does a minimal mutual "
             "HMAC-SHA256 challenge-response per connection with libcrypto directly. CPython 3.11's "
             "`multiprocessing.connection` does not set TCP_NODELAY: after the authkey handshake "
             "the client's two writes in a row meet the server's delayed ACK (about 40 ms), "
             "which is why Python's W8a is so low. W10a/b run mp::mpi and mpi4py.futures under "
             "`mpirun -n 3` (rank 0 hands out work to 2 worker ranks on this machine); their "
             "Limit column is the local mp pool doing the same work (W2a/W2b's mp side), so "
             "'mp vs limit' there is the share of the local pool's rate that MPI keeps. "
             "Definitions: bench/README.md.")
    L.append("")

    L.append("## Microbenchmarks (Google Benchmark, bench/bench_*.cpp)")
    L.append("")
    if micro is None:
        L.append("mp_bench not built.")
    elif micro["status"] != "ok":
        L.append(f"mp_bench failed: {micro['status']} {micro.get('detail', '')}")
    else:
        reps = micro.get("repetitions", 1)
        L.append(f"Median wall time per iteration over {reps} repetition(s).")
        L.append("")
        L.append("| Benchmark | Time (median) | Range over repetitions "
                 "| Iterations per repetition |")
        L.append("|---|---|---|---|")
        by_name = {}
        for b in sorted(micro["benchmarks"], key=lambda b: b["name"]):
            by_name[b["name"]] = b
            if "error" in b:
                L.append(f"| {b['name']} | error: {b['error']} | | |")
            else:
                runs = b.get("runs") or [b["time"]]
                L.append(f"| {b['name']} | {b['time']:.4g} {b['time_unit']} | "
                         f"{min(runs):.4g} – {max(runs):.4g} {b['time_unit']} | "
                         f"{b.get('iterations', '')} |")
        L.append("")
        bare, proc = by_name.get("BM_BareForkWaitpid"), by_name.get("BM_ProcessStartJoin")
        if bare and proc and "time" in bare and "time" in proc and bare["time"] > 0:
            ratio = proc["time"] / bare["time"]
            verdict = "meets" if ratio <= 1.2 else "misses"
            L.append(f"BM_ProcessStartJoin / BM_BareForkWaitpid = **{ratio:.2f}x** "
                     f"(lower is better; the foundation's target is <= 1.2x: {verdict} it"
                     f"{' — but quick mode proves nothing' if config['quick'] else ''}).")
            L.append("")

    L.append("## Machine")
    L.append("")
    for k in ("cpu", "cores", "memory", "kernel", "compiler", "python", "commit"):
        L.append(f"- {k}: {machine.get(k, '')}")
    L.append(f"- build: {config['build']} ({config.get('build_type', '?')})")
    L.append(f"- wall time of this run: {config['elapsed_s']:.0f} s")
    if config.get("other_load_cpus") is not None:
        L.append(f"- CPU used by other programs during the run: "
                 f"{config['other_load_cpus']:.2f} CPUs on average")
    state = config.get("machine_state") or {}
    L.append(f"- machine state before the run: {describe_state(state.get('start'))}; after it: "
             f"{describe_state(state.get('end'))} (`mp_limit_fork probe`). On a VM these follow "
             "the host (on this project's, the same bare fork cost 120-150 us one afternoon and "
             "750-1,300 us that evening, with page faults near 10 us), and so does every row "
             "that forks or faults pages in: compare such rows only between runs made in the "
             "same state.")
    for n in config.get("notes", []):
        L.append(f"- note: {n}")
    L.append("")
    L.append("Raw values of every run: latest.json. Regenerate: `make bench` "
             "(or `make bench-quick`).")
    L.append("")
    path.write_text("\n".join(L))


XLABEL = ("mp vs Python: how many times faster mp is than Python.   "
          "mp vs limit: the share of the machine's limit that mp reaches (1 = at the limit).")


YTICS = ", ".join(f'"{v:g}" {v:g}' for e in range(-3, 5) for v in (10.0 ** e, 3 * 10.0 ** e))


def write_chart(out_png, results, workdir):
    """One bar group per workload with an mp value: speed-up over Python, share of the limit."""
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        return False, "gnuplot not found"
    rows = [r for r in results if r["vs_python"] is not None or r["vs_limit"] is not None]
    data = workdir / "ratios.dat"
    with data.open("w") as f:
        # columns: workload, mp vs Python, mp vs limit, the target share of the limit (no
        # header line: it would count as a row)
        for r in rows:
            vp = r["vs_python"] if r["vs_python"] is not None else "NaN"
            vl = r["vs_limit"] if r["vs_limit"] is not None else "NaN"
            tg = r["workload"].get("limit_target", "NaN")
            f.write(f"\"{r['workload']['id']}\" {vp} {vl} {tg}\n")
    terms = subprocess.run([gnuplot, "-e", "set terminal"], capture_output=True,
                           text=True).stdout + subprocess.run(
        [gnuplot, "-e", "set terminal"], capture_output=True, text=True).stderr
    term = "pngcairo size 1100,650 font 'Sans,11'" if "pngcairo" in terms \
        else "png size 1100,650"
    # The target marks too: W1b's (a share of 20) may lie above every bar.
    values = [v for r in rows for v in (r["vs_python"], r["vs_limit"]) if v] + \
        [r["workload"]["limit_target"] for r in rows if r["workload"].get("limit_target")]
    lo = min(values + [0.5]) / 2
    hi = max(values + [2]) * 3
    # gnuplot fails on a column with no value at all (rows without a Python side, or without
    # a limit, or without a target): such a column is left out.
    with_python = any(r["vs_python"] is not None for r in rows)
    with_limit = any(r["vs_limit"] is not None for r in rows)
    with_target = any(r["workload"].get("limit_target") for r in rows)
    labels = "with labels offset 0,0.7 font \",9\" notitle"
    clauses = []
    if with_python:
        clauses += ["using 2:xtic(1) title \"mp vs Python (speed-up)\" lc rgb \"#1f77b4\""]
    if with_limit:
        clauses += [f"using 3{'' if with_python else ':xtic(1)'} title \"mp vs limit (share)\" "
                    "lc rgb \"#ff7f0e\""]
    if with_python:
        clauses += [f"using ($0 - 1.0/6):2:(sprintf(\"%.3g\", $2)) {labels}"]
    if with_limit:
        clauses += [f"using ($0 + 1.0/6):3:(sprintf(\"%.3g\", $3)) {labels}"]
    if with_target:
        clauses += ["using ($0 + 1.0/6):4 with points pt 9 ps 2.2 lc rgb \"#d62728\" "
                    "title \"target for mp vs limit (below it: missed)\""]
    plot = "plot " + ", \\\n     ".join(f"'{data}' {c}" for c in clauses)
    script = workdir / "ratios.gp"
    title = "mp vs Python multiprocessing and vs the machine limit (higher is better)"
    if not rows:
        script.write_text(f"""
set terminal {term}
set output '{out_png}'
unset border; unset tics; unset key
set title "{title}"
set label 1 "no workload has an mp side yet" at graph 0.5, 0.5 center
plot [0:1][0:1] NaN notitle
""")
    else:
        script.write_text(f"""
set terminal {term}
set output '{out_png}'
set title "{title}"
set style data histogram
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set logscale y
set yrange [{lo}:{hi}]
set ylabel "ratio (log scale; 1 = parity)"
set ytics ({YTICS})
set grid ytics
set key outside top center horizontal
set xtics nomirror rotate by 30 right font ",10"
set xrange [-0.6:{len(rows) - 0.4}]
set arrow from graph 0, first 1 to graph 1, first 1 nohead lc rgb "#444444" dt 2 lw 1.5
set xlabel "{XLABEL}" font ",10"
{plot}
""")
    p = subprocess.run([gnuplot, str(script)], capture_output=True, text=True)
    if p.returncode != 0:
        return False, "gnuplot failed: " + p.stderr.strip()[-300:]
    return True, ""


# ---- main ----------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--build", default="build/release", help="CMake build directory")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds in total (CI)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; quick: 2)")
    ap.add_argument("--only", help="comma-separated workload ids, e.g. W1,W4")
    ap.add_argument("--timeout", type=float, help="seconds per side run (default 120; quick: 30)")
    ap.add_argument("--out", help="output directory (default bench/results; quick: "
                                  "bench/results/quick, so CI never overwrites the real results)")
    ap.add_argument("--no-micro", action="store_true", help="skip the Google Benchmark binary")
    args = ap.parse_args()

    reps = args.reps or (2 if args.quick else 5)
    timeout = args.timeout or (30.0 if args.quick else 120.0)
    build = Path(args.build)
    if not build.is_absolute():
        build = (Path.cwd() / build).resolve()
    out = Path(args.out) if args.out else HERE / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    workloads = WORKLOADS
    refs = REFERENCES
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {w["id"] for w in WORKLOADS + REFERENCES}
        if unknown:
            ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
        workloads = [w for w in WORKLOADS if w["id"] in wanted]
        refs = [w for w in REFERENCES if w["id"] in wanted]

    started = datetime.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    try:
        sides = Sides(build, workdir)
        sides.timeout = timeout
        machine = machine_info(sides)
        build_type = ""
        cache = build / "CMakeCache.txt"
        if cache.exists():
            for line in cache.read_text().splitlines():
                if line.startswith("CMAKE_BUILD_TYPE:"):
                    build_type = line.split("=", 1)[1]

        def size_of(w, side):
            if args.quick:
                return w["quick"]
            return w["py"] if side == "python" else w["cpp"]

        raw = {w["id"]: {s: [] for s in SIDES} for w in workloads}
        raw_refs = {w["id"]: [] for w in refs}
        methods = {w["id"]: {} for w in workloads}
        broken = []
        print(f"run.py: {len(workloads)} workloads x 3 sides x {reps} repetitions"
              f"{' (quick)' if args.quick else ''}; build {build}", flush=True)
        for n in sides.notes:
            print(f"run.py: note: {n}", flush=True)
        state_start = machine_state(sides)
        others = OtherLoad()
        for rep in range(1, reps + 1):
            for w in workloads:
                line = []
                for side in SIDES:
                    argv = sides.argv(side, w["id"], size_of(w, side), w)
                    if argv and args.quick and w.get("pass_quick"):
                        argv = argv + ["--quick"]
                    if argv is None:
                        o = Outcome("n/a", detail="no such side, or its program is not built")
                    else:
                        o = run_side(argv, timeout, sides.expected(side, w))
                    raw[w["id"]][side].append(o)
                    if o.record.get("method"):
                        methods[w["id"]][side] = o.record["method"]
                        if side == "limit" and w.get("limit_as") and w.get("mpi"):
                            methods[w["id"]][side] = (f"not a limit: the local pool, the mp side "
                                                      f"of {w['limit_as']}: " + o.record["method"])
                    if o.status in ("error", "timeout"):
                        broken.append(f"{w['id']} {side} (repetition {rep}): {o.status}: "
                                      f"{o.detail}")
                    line.append(f"{side} " + (fmt_num(o.value) if o.status == "ok"
                                              else o.status))
                print(f"  [{rep}/{reps}] {w['id']:<9} " + " | ".join(line) + f"  ({w['unit']})",
                      flush=True)
            for w in refs:
                o = run_side(sides.argv("limit", w["id"], w["quick" if args.quick else "cpp"]),
                             timeout, w["id"])
                raw_refs[w["id"]].append(o)
                if o.status in ("error", "timeout"):
                    broken.append(f"{w['id']} limit (repetition {rep}): {o.status}: {o.detail}")

        micro = None
        if not args.no_micro:
            print("run.py: microbenchmarks (mp_bench)", flush=True)
            micro = run_micro(sides, args.quick, timeout=120 if args.quick else 600)
            if micro is not None and micro["status"] != "ok":
                broken.append(f"mp_bench: {micro['status']}: {micro.get('detail', '')}")

        results = []
        for w in workloads:
            s = {side: summarize(raw[w["id"]][side]) for side in SIDES}
            results.append({
                "workload": dict(w, cpp_size=w["quick"] if args.quick else w["cpp"],
                                 py_size=w["quick"] if args.quick else w["py"]),
                "summary": s,
                "methods": methods[w["id"]],
                "vs_python": oriented(s["mp"]["median"], s["python"]["median"], w["better"]),
                "vs_limit": oriented(s["mp"]["median"], s["limit"]["median"], w["better"]),
            })
        ref_results = [{"workload": dict(w, cpp_size=w["quick"] if args.quick else w["cpp"]),
                        "summary": summarize(raw_refs[w["id"]])} for w in refs]

        elapsed = (datetime.datetime.now() - started).total_seconds()
        config = {"quick": args.quick, "reps": reps, "timeout_s": timeout,
                  "build": str(build.relative_to(ROOT) if build.is_relative_to(ROOT) else build),
                  "build_type": build_type or "?", "date": started.strftime("%Y-%m-%d %H:%M"),
                  "elapsed_s": elapsed, "notes": sides.notes,
                  "other_load_cpus": others.cpus(),
                  "machine_state": {"start": state_start, "end": machine_state(sides)}}

        png = out / "ratios.png"
        chart_ok, why = write_chart(png, results, workdir)
        if not chart_ok:
            print(f"run.py: no chart: {why}", file=sys.stderr)
        write_markdown(out / "latest.md", results, ref_results, micro, machine, config, chart_ok)
        (out / "latest.json").write_text(json.dumps({
            "config": config,
            "machine": machine,
            "workloads": [{
                "id": r["workload"]["id"], "title": r["workload"]["title"],
                "unit": r["workload"]["unit"], "better": r["workload"]["better"],
                "size": {"mp": r["workload"]["cpp_size"], "python": r["workload"]["py_size"],
                         "limit": r["workload"]["cpp_size"], "unit": r["workload"]["size_unit"]},
                "methods": r["methods"],
                "raw": {side: [o.to_json() for o in raw[r["workload"]["id"]][side]]
                        for side in SIDES},
                "median": {side: r["summary"][side]["median"] for side in SIDES},
                "mp_vs_python": r["vs_python"], "mp_vs_limit": r["vs_limit"],
            } for r in results],
            "references": [{
                "id": r["workload"]["id"], "title": r["workload"]["title"],
                "unit": r["workload"]["unit"], "size": r["workload"]["cpp_size"],
                "raw": [o.to_json() for o in raw_refs[r["workload"]["id"]]],
                "median": r["summary"]["median"],
            } for r in ref_results],
            "micro": micro,
            "problems": broken,
        }, indent=1) + "\n")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print((out / "latest.md").read_text())
    print(f"run.py: wrote {out / 'latest.md'}, {out / 'latest.json'}"
          f"{', ' + str(png) if chart_ok else ''} in {elapsed:.0f} s")
    if broken:
        print("run.py: FAILED sides:", file=sys.stderr)
        for b in broken:
            print("  " + b, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
