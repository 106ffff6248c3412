"""An unmodified CPython resource_sharer server for steward's CPython client tests.

usage: cpython_share_server.py HEXKEY
Shares (with multiprocessing.resource_sharer.DupFd, i.e. CPython's own code) a memfd holding
b"memfd contents from CPython" and the read end of a pipe holding b"pipe contents from CPython",
prints one line per share: "ADDRESS KEY" (DupFd._id), then keeps serving until stdin closes.
"""
import multiprocessing
import os
import sys

from multiprocessing.resource_sharer import DupFd


def quiet_excepthook(kind, value, _tb):
    # resource_sharer reports a refused connection (KeyError, AuthenticationError) through
    # sys.excepthook and keeps serving; one line is enough in test logs.
    print(f"cpython share server: {kind.__name__}: {value}", file=sys.stderr, flush=True)


def main():
    sys.excepthook = quiet_excepthook
    multiprocessing.current_process().authkey = bytes.fromhex(sys.argv[1])
    memfd = os.memfd_create("steward-cpython-test")
    os.write(memfd, b"memfd contents from CPython")
    os.lseek(memfd, 0, os.SEEK_SET)
    r, w = os.pipe()
    os.write(w, b"pipe contents from CPython")
    os.close(w)
    shares = [DupFd(memfd), DupFd(r)]
    os.close(memfd)  # DupFd holds its own duplicate
    os.close(r)
    for share in shares:
        address, key = share._id
        print(address, key, flush=True)
    sys.stdin.read()  # serve until the test closes our stdin


if __name__ == "__main__":
    main()
