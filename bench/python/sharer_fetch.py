# CPython baseline: fetches through multiprocessing.resource_sharer, CPython's only shape (a new
# AF_UNIX connection, the mutual HMAC handshake and a pickled request per descriptor).
# The parent shares N descriptors with resource_sharer.DupFd (its server thread answers); a forked
# child fetches them one after another with DupFd.detach() and times each fetch. Prints one JSON
# line like the bench/*_bench programs.
#
# usage: sharer_fetch.py --scenario S --variant cpython --n N
import argparse
import json
import os
import time

from multiprocessing import resource_sharer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="fetch_connect")
    p.add_argument("--variant", default="cpython")
    p.add_argument("--n", type=int, default=2000)
    a = p.parse_args()
    base = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    shares = [resource_sharer.DupFd(base) for _ in range(a.n)]  # starts the server thread
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        # The child's copies of the shared descriptors (the server's stay in the parent).
        for _key, (_send, close) in list(resource_sharer._resource_sharer._cache.items()):
            close()
        latencies = []
        t0 = time.perf_counter()
        for share in shares:
            s = time.perf_counter()
            fd = share.detach()
            latencies.append(time.perf_counter() - s)
            os.close(fd)
        seconds = time.perf_counter() - t0
        latencies.sort()
        ns = [x * 1e9 for x in latencies]
        out = {
            "scenario": a.scenario, "variant": a.variant, "status": "ok", "unit": "fetch/s",
            "higher_is_better": True, "value": a.n / seconds, "count": a.n, "seconds": seconds,
            "latency_ns": {"p50": ns[len(ns) // 2], "p99": ns[min(len(ns) - 1, int(0.99 * len(ns)))],
                           "max": ns[-1], "samples": len(ns)},
        }
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        print(json.dumps({"scenario": a.scenario, "variant": a.variant, "status": "error",
                          "reason": "fetching child failed (status %d)" % status}))
        raise SystemExit(1)
    print(data.decode())


if __name__ == "__main__":
    main()
