#!/usr/bin/env python3
"""The Python side of bench/run.py: each workload written as a Python user would write it, with
multiprocessing, concurrent.futures, multiprocessing.connection and managers (standard library
only). One workload per invocation; prints one JSON line:

    python3 bench/python/workloads.py W4 [--size N] [--quick]
    {"workload": "W4", "value": 123456.7, "unit": "msgs/s", "size": 100000, "method": "..."}

Start method: fork everywhere (the Linux default of Python 3.11, set explicitly so 3.14's change
of default does not change the numbers). Process start-up is never inside the timed region except
in W1, whose subject it is; pools are warmed up (every worker started) before timing.

Where the full size would take Python minutes, the default size is smaller (see PYTHON_SIZES) and
the value is a rate or a per-operation time, so it stays comparable with the full-size C++ runs.
A failed check (a wrong result or count) raises: the process exits non-zero, which the runner
reports as a broken benchmark.
"""

import argparse
import json
import os
import multiprocessing as mp
import multiprocessing.connection as mpc
import sys
import time
from concurrent.futures import ProcessPoolExecutor

CTX = mp.get_context("fork")

# workload -> (full size, quick size). Units of "size": W1 starts, W2 tasks, W3 tasks,
# W4 messages, W5 1-MiB messages, W6 round trips, W7 increments per process, W8a milliseconds,
# W8b round trips, W9 set+get pairs.
PYTHON_SIZES = {
    "W1": (200, 20),
    "W2a": (20_000, 2_000),      # full C++ size 100,000: ProcessPoolExecutor.submit is ~30 us/task
    "W2a-steady": (20_000, 2_000),
    "W2b": (100_000, 10_000),
    "W3": (64, 8),
    "W4": (200_000, 20_000),     # full C++ size 1,000,000
    "W5": (1024, 16),
    "W6-pipe": (100_000, 2_000),
    "W6-pipe-oneway": (100_000, 2_000),
    "W6-queue": (20_000, 2_000),  # full C++ size 100,000
    "W7": (200_000, 20_000),     # full C++ size 1,000,000 per process
    "W8a": (3000, 200),
    "W8b": (20_000, 1_000),
    "W9": (5_000, 500),          # full C++ size 20,000
    "W10a": (20_000, 2_000),     # full C++ size 100,000
    "W10b": (100_000, 10_000),
    "W12a": (20_000, 1_000),
    "W12a-decode": (200_000, 10_000),
    "W12a-decode-flat": (200_000, 10_000),
    "W12b": (20_000, 1_000),
}

TASK_MS = 20.0  # W3 task length (quick mode too: only the count shrinks)


def result(workload, value, unit, size, method):
    print(json.dumps({"workload": workload, "value": value, "unit": unit, "size": size,
                      "method": method}), flush=True)


# ---- W1 ------------------------------------------------------------------------------------------

def empty():
    pass


def w1(n):
    t0 = time.perf_counter()
    for _ in range(n):
        p = CTX.Process(target=empty)
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError("W1: child failed")
    dt = time.perf_counter() - t0
    result("W1", dt * 1e6 / n, "us", n, "multiprocessing.Process (fork), start + join")


# ---- W2 ------------------------------------------------------------------------------------------

def square(x):
    return x * x


def warm_pool(ex):
    # Under fork, the first submit starts every worker; wait until they all ran something.
    out = list(ex.map(square, range(16)))
    if out != [x * x for x in range(16)]:
        raise RuntimeError("warm-up: wrong results")


def check_squares(out, n, workload):
    if out != [x * x for x in range(n)]:
        raise RuntimeError(f"{workload}: wrong results")


# The work of W2 (local pool) and W10 (MPI), as bench/executor_work.hpp: tasks per second.
def submit_then_results(ex, n, workload):
    t0 = time.perf_counter()
    futures = [ex.submit(square, x) for x in range(n)]
    out = [f.result() for f in futures]
    dt = time.perf_counter() - t0
    check_squares(out, n, workload)
    return n / dt


def chunked_map(ex, n, workload):
    t0 = time.perf_counter()
    out = list(ex.map(square, range(n), chunksize=1000))
    dt = time.perf_counter() - t0
    check_squares(out, n, workload)
    return n / dt


def w2a(n):
    with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
        warm_pool(ex)
        rate = submit_then_results(ex, n, "W2a")
    result("W2a", rate, "tasks/s", n,
           "ProcessPoolExecutor(2): submit every task, then result() of each in order")


def w2a_steady(n):
    with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
        warm_pool(ex)
        for _ in range(3):
            submit_then_results(ex, n, "W2a-steady")
        rate = submit_then_results(ex, n, "W2a-steady")
    result("W2a-steady", rate, "tasks/s", n,
           "ProcessPoolExecutor(2): W2a's fourth batch on the same executor")


def w2b(n):
    with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
        warm_pool(ex)
        rate = chunked_map(ex, n, "W2b")
    result("W2b", rate, "tasks/s", n, "ProcessPoolExecutor(2).map(chunksize=1000)")


# ---- W3 ------------------------------------------------------------------------------------------

def burn(seed):
    """Burns TASK_MS of this thread's CPU time in an arithmetic loop; returns a checksum."""
    end = time.thread_time() + TASK_MS / 1000
    x = seed
    while True:
        for _ in range(200):
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        if time.thread_time() >= end:
            return x


def w3(n):
    t0 = time.perf_counter()
    for i in range(n):
        burn(i)
    serial = time.perf_counter() - t0
    with ProcessPoolExecutor(max_workers=2, mp_context=CTX) as ex:
        warm_pool(ex)
        t0 = time.perf_counter()
        out = list(ex.map(burn, range(n)))
        parallel = time.perf_counter() - t0
    if len(out) != n:
        raise RuntimeError("W3: wrong task count")
    result("W3", serial / (2 * parallel), "efficiency", n,
           "ProcessPoolExecutor(2).map, 20 ms CPU-time tasks, chunksize 1")


# ---- W4 / W5 -------------------------------------------------------------------------------------

def producer(q, start, n, size):
    payload = bytes(size)
    start.wait()
    for _ in range(n):
        q.put(payload)


def queue_transfer(workload, n, size):
    q = CTX.Queue()
    start = CTX.Event()
    p = CTX.Process(target=producer, args=(q, start, n, size))
    p.start()
    t0 = time.perf_counter()
    start.set()
    for _ in range(n):
        m = q.get()
        if len(m) != size:
            raise RuntimeError(workload + ": wrong message size")
    dt = time.perf_counter() - t0
    p.join()
    return dt


def w4(n):
    dt = queue_transfer("W4", n, 64)
    result("W4", n / dt, "msgs/s", n, "multiprocessing.Queue, 64-byte bytes objects")


def w5(n):
    dt = queue_transfer("W5", n, 1 << 20)
    result("W5", n * (1 << 20) / dt / 1e6, "MB/s", n,
           "multiprocessing.Queue, 1 MiB bytes objects")


# ---- W6 ------------------------------------------------------------------------------------------

def pipe_echo(ping, pong):
    while True:
        m = ping.recv_bytes()
        if not m:
            return
        pong.send_bytes(m)


def ping_pong(name, ping_w, ping_r, pong_w, pong_r, n, method):
    p = CTX.Process(target=pipe_echo, args=(ping_r, pong_w))
    p.start()
    msg = b"\x01" * 8
    t0 = time.perf_counter()
    for _ in range(n):
        ping_w.send_bytes(msg)
        if pong_r.recv_bytes() != msg:
            raise RuntimeError(name + ": wrong echo")
    dt = time.perf_counter() - t0
    ping_w.send_bytes(b"")
    p.join()
    result(name, dt * 1e6 / n, "us", n, method)


def w6_pipe(n):
    a, b = CTX.Pipe()
    ping_pong("W6-pipe", a, b, b, a, n, "multiprocessing.Pipe(), send_bytes/recv_bytes")


def w6_pipe_oneway(n):
    ping_r, ping_w = CTX.Pipe(duplex=False)
    pong_r, pong_w = CTX.Pipe(duplex=False)
    ping_pong("W6-pipe-oneway", ping_w, ping_r, pong_w, pong_r, n,
              "two multiprocessing.Pipe(duplex=False), send_bytes/recv_bytes")


def queue_echo(inq, outq):
    while True:
        m = inq.get()
        if m is None:
            return
        outq.put(m)


def w6_queue(n):
    ping, pong = CTX.Queue(), CTX.Queue()
    p = CTX.Process(target=queue_echo, args=(ping, pong))
    p.start()
    msg = b"\x01" * 8
    ping.put(msg)  # the first put starts each queue's feeder thread: keep it out of the timing
    pong.get()
    t0 = time.perf_counter()
    for _ in range(n):
        ping.put(msg)
        if pong.get() != msg:
            raise RuntimeError("W6-queue: wrong echo")
    dt = time.perf_counter() - t0
    ping.put(None)
    p.join()
    result("W6-queue", dt * 1e6 / n, "us", n, "two multiprocessing.Queue, put/get of 8-byte bytes")


# ---- W7 ------------------------------------------------------------------------------------------

def pin_to_cpu(k):
    """The k-th CPU this process may run on, alone (as bench/pin_cpu.hpp: W7 runs one per CPU)."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        os.sched_setaffinity(0, {allowed[k % len(allowed)]})


def incrementer(counter, start, n, cpu):
    pin_to_cpu(cpu)
    lock = counter.get_lock()
    start.wait()
    for _ in range(n):
        with lock:
            counter.value += 1


def w7(n):
    counter = CTX.Value("q", 0)
    start = CTX.Event()
    ps = [CTX.Process(target=incrementer, args=(counter, start, n, k)) for k in range(2)]
    for p in ps:
        p.start()
    t0 = time.perf_counter()
    start.set()
    for p in ps:
        p.join()
    dt = time.perf_counter() - t0
    if counter.value != 2 * n:
        raise RuntimeError("W7: wrong final count %d" % counter.value)
    result("W7", dt * 1e9 / (2 * n), "ns", n,
           "multiprocessing.Value('q') and its lock (an RLock), 2 processes, one per CPU")


# ---- W8 ------------------------------------------------------------------------------------------

AUTHKEY = b"mp-bench-secret-key"


def echo_server(listener):
    # One connection at a time; an empty request is the stop signal.
    while True:
        with listener.accept() as c:
            try:
                while True:
                    m = c.recv_bytes()
                    if not m:
                        return
                    c.send_bytes(m)
            except EOFError:
                pass


def start_server():
    listener = mpc.Listener(("127.0.0.1", 0), authkey=AUTHKEY)
    p = CTX.Process(target=echo_server, args=(listener,))
    p.start()
    address = listener.address
    listener.close()  # the server child holds its own copy
    return p, address


def stop_server(p, address):
    with mpc.Client(address, authkey=AUTHKEY) as c:
        c.send_bytes(b"")
    p.join()


def w8a(ms):
    p, address = start_server()
    msg = b"\x01" * 8
    count = 0
    t0 = time.perf_counter()
    end = t0 + ms / 1000
    while time.perf_counter() < end:
        with mpc.Client(address, authkey=AUTHKEY) as c:
            c.send_bytes(msg)
            if c.recv_bytes() != msg:
                raise RuntimeError("W8a: wrong echo")
        count += 1
    dt = time.perf_counter() - t0
    stop_server(p, address)
    result("W8a", count / dt, "requests/s", ms,
           "Client(authkey) per request: handshake, 8-byte send_bytes/recv_bytes, close")


def w8b(n):
    p, address = start_server()
    msg = b"\x01" * 8
    with mpc.Client(address, authkey=AUTHKEY) as c:
        t0 = time.perf_counter()
        for _ in range(n):
            c.send_bytes(msg)
            if c.recv_bytes() != msg:
                raise RuntimeError("W8b: wrong echo")
        dt = time.perf_counter() - t0
    stop_server(p, address)
    result("W8b", dt * 1e6 / n, "us", n, "one Client(authkey) connection, 8-byte round trips")


# ---- W9 ------------------------------------------------------------------------------------------

def dict_user(d, n, report):
    t0 = time.perf_counter()
    for i in range(n):
        d[i] = i
        if d[i] != i:
            raise RuntimeError("W9: wrong value")
    report.send(time.perf_counter() - t0)


def w9(n):
    with CTX.Manager() as manager:
        d = manager.dict()
        r, w = CTX.Pipe(duplex=False)
        p = CTX.Process(target=dict_user, args=(d, n, w))
        p.start()
        dt = r.recv()
        p.join()
        if p.exitcode != 0 or len(d) != n:
            raise RuntimeError("W9: the child failed")
    result("W9", 2 * n / dt, "ops/s", n, "SyncManager().dict() proxy used from a child process")


# ---- W12a: Python sends dicts of 10 str -> int with conn.send, the peer answers a list ---------
# The mp side (bench/mp_workloads.cpp) listens with an mp Listener and runs this script as
#     workloads.py W12a-client --size N --address PATH --authkey KEY
# so both sides time the same client; here the peer is a Python process doing the same work.

W12A_AUTHKEY = "w12a-key"


def w12a_message():
    return {"key%d" % i: i for i in range(10)}


def w12a_round_trips(address, authkey, n):
    with mpc.Client(address, authkey=authkey) as c:
        d = w12a_message()
        c.send(d)  # the first exchange is outside the timing
        c.recv()
        t0 = time.perf_counter()
        for k in range(n):
            d["key0"] = k
            c.send(d)
            reply = c.recv()
            if len(reply) != 10 or reply[0] != k or reply[9] != 9:
                raise RuntimeError("W12a: wrong reply %r" % (reply,))
        dt = time.perf_counter() - t0
        c.send(None)  # stop
    return n / dt


def w12a_server(listener):
    with listener.accept() as c:
        while True:
            d = c.recv()
            if d is None:
                return
            c.send(list(d.values()))


def w12a(n):
    import os
    import tempfile
    with tempfile.TemporaryDirectory(prefix="w12a.") as tmp:
        address = os.path.join(tmp, "peer.sock")
        # Open until the peer is done: closing a Unix-socket Listener removes its path.
        with mpc.Listener(address, authkey=W12A_AUTHKEY.encode()) as listener:
            p = CTX.Process(target=w12a_server, args=(listener,), daemon=True)
            p.start()
            rate = w12a_round_trips(address, W12A_AUTHKEY.encode(), n)
            p.join()
    result("W12a", rate, "round trips/s", n,
           "Python to Python: conn.send(dict of 10 str -> int), the peer's conn.recv() and "
           "conn.send(list of the 10 values) (Unix socket, authkey)")


def w12a_client(n, address, authkey):
    print("RATE", w12a_round_trips(address, authkey.encode(), n), flush=True)


def w12a_decode(n, wid="W12a-decode"):
    import pickle
    p = pickle.dumps(w12a_message())  # the bytes conn.send writes (protocol 4)
    loads = pickle.loads
    loads(p)
    t0 = time.perf_counter()
    for _ in range(n):
        loads(p)
    dt = time.perf_counter() - t0
    result(wid, dt * 1e9 / n, "ns", n, "pickle.loads of the W12a message (C pickle module)")


# ---- W12b: a Python client's dict proxy, against Python's SyncManager (here) or an mp manager ----
# The mp side (bench/mp_workloads.cpp) starts an mp manager and runs this script as
#     workloads.py W12b-client --size N --address PATH --authkey KEY
# so both sides time the same client code; only the server differs.

def dict_client(address, authkey, n):
    from multiprocessing.managers import SyncManager
    m = SyncManager(address=address, authkey=authkey)
    m.connect()
    d = m.dict()
    d[-1] = -1           # the proxy's connection is made outside the timing
    t0 = time.perf_counter()
    for i in range(n):
        d[i] = i
        if d[i] != i:
            raise RuntimeError("W12b: wrong value")
    dt = time.perf_counter() - t0
    if len(d) != n + 1:
        raise RuntimeError("W12b: wrong size")
    return 2 * n / dt


def w12b(n):
    with CTX.Manager() as manager:
        rate = dict_client(manager.address, bytes(mp.current_process().authkey), n)
    result("W12b", rate, "ops/s", n,
           "a Python client's SyncManager().dict() proxy: d[i] = i, then d[i] (Unix socket)")


def w12b_client(n, address, authkey):
    print("RATE", dict_client(address, authkey.encode(), n), flush=True)


# ---- W10: the executor over MPI (mpi4py.futures), run by run.py as -------------------------------
#     mpirun -n 3 python3 -m mpi4py.futures bench/python/workloads.py W10a --size N
# Rank 0 runs this script; ranks 1 and 2 are mpi4py's workers (2 workers, like W2's pool).

def mpi_executor(workload):
    try:
        from mpi4py import MPI
        from mpi4py.futures import MPIPoolExecutor
    except ImportError:
        result(workload, None, "tasks/s", 0, "mpi4py is not installed (python3-mpi4py)")
        return None
    if MPI.COMM_WORLD.Get_size() < 2:
        raise RuntimeError(f"{workload}: run under mpirun -n 3 python3 -m mpi4py.futures")
    ex = MPIPoolExecutor()
    warm_pool(ex)  # every worker has run something
    return ex


def w10a(n):
    ex = mpi_executor("W10a")
    if ex is None:
        return
    with ex:
        rate = submit_then_results(ex, n, "W10a")
    result("W10a", rate, "tasks/s", n,
           "mpi4py.futures.MPIPoolExecutor, mpirun -n 3 (2 worker ranks): submit every task, "
           "then result() of each")


def w10b(n):
    ex = mpi_executor("W10b")
    if ex is None:
        return
    with ex:
        rate = chunked_map(ex, n, "W10b")
    result("W10b", rate, "tasks/s", n,
           "mpi4py.futures.MPIPoolExecutor, mpirun -n 3 (2 worker ranks): map, chunksize 1000")


WORKLOADS = {
    "W10a": w10a, "W10b": w10b,
    "W1": w1, "W2a": w2a, "W2a-steady": w2a_steady, "W2b": w2b, "W3": w3, "W4": w4, "W5": w5,
    "W6-pipe": w6_pipe, "W6-pipe-oneway": w6_pipe_oneway,
    "W6-queue": w6_queue, "W7": w7, "W8a": w8a, "W8b": w8b, "W9": w9,
    "W12a": w12a, "W12a-decode": w12a_decode,
    # The same pickle.loads: the mp side reads the message into another type.
    "W12a-decode-flat": lambda n: w12a_decode(n, "W12a-decode-flat"),
    "W12b": w12b,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=sorted(WORKLOADS) + ["W12a-client", "W12b-client"])
    ap.add_argument("--size", type=int, help="override the default size")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds in total)")
    ap.add_argument("--address", help="W12a/W12b-client: the peer's or manager's Unix socket path")
    ap.add_argument("--authkey", help="W12a/W12b-client: its authkey")
    args = ap.parse_args()
    if args.workload == "W12a-client":
        w12a_client(args.size or PYTHON_SIZES["W12a"][0], args.address, args.authkey)
        return
    if args.workload == "W12b-client":
        w12b_client(args.size or PYTHON_SIZES["W12b"][0], args.address, args.authkey)
        return
    full, quick = PYTHON_SIZES[args.workload]
    WORKLOADS[args.workload](args.size or (quick if args.quick else full))


if __name__ == "__main__":
    main()
