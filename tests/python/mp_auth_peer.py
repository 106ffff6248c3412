"""CPython's own multiprocessing.connection as the peer of steward's handshake tests.

usage: mp_auth_peer.py listen PATH HEXKEY   -> Listener; prints "ready", accepts one client,
                                               sends b"python-ok" after the handshake
       mp_auth_peer.py connect PATH HEXKEY  -> Client; after the handshake sends b"hi from python"
Exit status: 0 handshake succeeded, 3 AuthenticationError, 4 any other error.
"""
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener


def wait_for_close(conn):
    try:
        conn.recv_bytes()
    except EOFError:
        pass


def main():
    mode, path, hexkey = sys.argv[1:4]
    key = bytes.fromhex(hexkey)
    try:
        if mode == "listen":
            with Listener(address=path, family="AF_UNIX", authkey=key) as listener:
                print("ready", flush=True)
                with listener.accept() as conn:
                    conn.send_bytes(b"python-ok")
                    wait_for_close(conn)
        else:
            with Client(path, family="AF_UNIX", authkey=key) as conn:
                conn.send_bytes(b"hi from python")
                wait_for_close(conn)
    except AuthenticationError as e:
        print("auth-failed", e, flush=True)
        return 3
    except Exception as e:  # noqa: BLE001 - report anything else distinctly
        print("error", type(e).__name__, e, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
