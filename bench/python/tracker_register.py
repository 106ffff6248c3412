# CPython baseline: multiprocessing.resource_tracker.register/unregister through its public API,
# one thread calling in a loop (CPython's calls are serialised by the tracker's lock, so more
# threads do not go faster). Prints one JSON line like the bench/*_bench programs.
#
# usage: tracker_register.py --scenario S --variant cpython --n N
import argparse
import json
import time

from multiprocessing import resource_tracker


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", default="register_serial")
    p.add_argument("--variant", default="cpython")
    p.add_argument("--n", type=int, default=200000)
    a = p.parse_args()
    names = ["/psm_%08x" % (i // 2) for i in range(a.n)]
    resource_tracker.ensure_running()  # start the daemon before the clock
    register, unregister = resource_tracker.register, resource_tracker.unregister
    t0 = time.perf_counter()
    for i in range(0, a.n - 1, 2):
        register(names[i], "shared_memory")
        unregister(names[i], "shared_memory")
    seconds = time.perf_counter() - t0
    count = a.n - a.n % 2
    print(json.dumps({
        "scenario": a.scenario, "variant": a.variant, "status": "ok", "unit": "msg/s",
        "higher_is_better": True, "value": count / seconds, "count": count, "seconds": seconds,
    }))


if __name__ == "__main__":
    main()
