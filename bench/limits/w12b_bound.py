"""W12b's bound, in CPU time per op (steady under load, unlike wall-clock rates).

    python3 bench/limits/w12b_bound.py N PATH_TO_w12b_instant

W12b's client loop (d[i] = i, then d[i]) against Python's SyncManager, and the same proxy pointed,
after it was created, at w12b_instant (a server that answers every request at once, with no
check of the value). For each: the client's CPU time per op and the server's. A round trip is
serial, so a server's rate is about 1 / (client + server CPU per op): the instant server's sum
bounds what any server can reach against Python's sum.
"""
import multiprocessing as mp, sys, time, os, subprocess
def cpu_of(pid):
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
def loop(d, n, check, server_pid):
    d[-1] = -1
    s0 = cpu_of(server_pid); c0 = time.process_time()
    for i in range(n):
        d[i] = i
        v = d[i]
        if check and v != i: raise RuntimeError("wrong")
    return (time.process_time() - c0) / (2 * n) * 1e6, (cpu_of(server_pid) - s0) / (2 * n) * 1e6
n = int(sys.argv[1])
ctx = mp.get_context("fork")
key = bytes(mp.current_process().authkey)
path = "/tmp/w12b_instant.%d.sock" % os.getpid()
if os.path.exists(path): os.unlink(path)
srv = subprocess.Popen([sys.argv[2], path, key.hex()])
time.sleep(0.3)
for rep in range(3):
    with ctx.Manager() as m:
        d = m.dict()
        c, s = loop(d, n, True, m._process.pid)
    print("Python SyncManager: client %.1f us/op, server %.1f us/op" % (c, s), flush=True)
    with ctx.Manager() as m:
        d = m.dict()
        d._token.address = path
        d[-2] = 0  # connects: the per-connection child of ./instant
        kids = [int(x) for x in open("/proc/%d/task/%d/children" % (srv.pid, srv.pid)).read().split()]
        c2, s2 = loop(d, n, False, kids[-1])
        d._token.address = m.address
    print("instant server:     client %.1f us/op, server %.1f us/op" % (c2, s2), flush=True)
srv.kill(); srv.wait(); os.unlink(path)
