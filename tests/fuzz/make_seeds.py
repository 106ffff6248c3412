#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/corpus/<target>/).

The seeds are checked in; this script documents how each was made and regenerates them. It uses
CPython's own hmac and pickle modules, so the handshake transcripts and pickles are what a real
CPython peer sends, computed independently of steward's codecs. Usage:

    python3 tests/fuzz/make_seeds.py            # rewrite every corpus/<target>/seed-* file

Files named regression-* (inputs that once found a bug) are left alone.
"""

import hmac
import os
import pickle
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

# The fixed values the targets use (docs/protocol.md known-answer vector).
AUTHKEY = bytes(range(0x00, 0x20))
SERVER_NONCE = bytes(range(0x40, 0x68))  # steward as server challenges with this
CLIENT_NONCE = bytes(range(0x80, 0xA8))  # steward as client challenges with this
PEER_NONCE = bytes(range(0xC0, 0xE8))    # the fuzzed peer's own challenge
CHALLENGE = b"#CHALLENGE#"


def write(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


def clear(target):
    folder = os.path.join(CORPUS, target)
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("seed-"):
                os.remove(os.path.join(folder, name))


# ---- tracker_line ------------------------------------------------------------------------------

def json_line(cmd, rtype, name=None, extra=""):
    import base64
    import json
    obj = {"cmd": cmd, "rtype": rtype}
    if name is not None:
        obj["base64_name"] = base64.urlsafe_b64encode(name).decode("ascii")
    text = json.dumps(obj, separators=(",", ":"))
    if extra:
        text = text[:-1] + "," + extra + "}"
    return text.encode("ascii") + b"\n"


def tracker_line():
    t = "tracker_line"
    clear(t)
    write(t, "register-shm", b"REGISTER:/psm_3f2a91:shared_memory\n")
    write(t, "unregister-shm-no-slash", b"UNREGISTER:psm_3f2a91:shared_memory\n")
    write(t, "register-semaphore", b"REGISTER:/mp-k1x9:semaphore\n")
    write(t, "register-file", b"REGISTER:/tmp/steward/data.bin:file\n")
    write(t, "register-directory-unclean", b"REGISTER:/tmp//steward/cache/:directory\n")
    write(t, "probe", b"PROBE:0:noop\n")
    write(t, "name-with-colons", b"REGISTER:/a:b:c:shared_memory\n")
    write(t, "blanks-around", b"  \tREGISTER:/psm_x:shared_memory \r\n")
    write(t, "json-register-utf8", json_line("REGISTER", "shared_memory", "/psm_é\n".encode()))
    write(t, "json-probe-no-name", json_line("PROBE", "noop"))
    write(t, "json-extra-fields",
          json_line("UNREGISTER", "file", b"/tmp/x", '"x":[1,-2.5e3,{"a":null,"b":true}],"y":"\\u00e9\\ud83d\\ude00"'))
    write(t, "json-escapes",
          b'{"cmd":"REGISTER","rtype":"semaphore","base64_name":"L3NlbV\\/x"}\n')
    write(t, "json-standard-alphabet", b'{"cmd":"REGISTER","rtype":"file","base64_name":"L3RtcC8+Pz8="}\n')
    write(t, "stream-of-messages",
          b"REGISTER:/psm_a:shared_memory\nREGISTER:/sem_b:semaphore\n"
          + json_line("REGISTER", "file", b"/tmp/\x01bin")
          + b"UNREGISTER:/psm_a:shared_memory\nPROBE:0:noop\nREGISTER:/partial")
    write(t, "exactly-512", b"REGISTER:/" + b"n" * (512 - len(b"REGISTER:/:shared_memory\n")) + b":shared_memory\n")
    write(t, "too-long-513", b"REGISTER:/" + b"n" * (513 - len(b"REGISTER:/:shared_memory\n")) + b":shared_memory\n")
    write(t, "too-long-then-valid", b"X" * 700 + b"\nREGISTER:/psm_ok:shared_memory\n")
    # Refused lines, one per decode error.
    write(t, "bad-missing-separator", b"REGISTER:/psm_x\n")
    write(t, "bad-unknown-command", b"DELETE:/psm_x:shared_memory\n")
    write(t, "bad-unknown-type", b"REGISTER:/psm_x:dummy\n")
    write(t, "bad-noop-registered", b"REGISTER:/psm_x:noop\n")
    write(t, "bad-relative-file", b"REGISTER:tmp/x:file\n")
    write(t, "bad-dotdot", b"REGISTER:/tmp/../etc/passwd:file\n")
    write(t, "bad-root", b"REGISTER:/:directory\n")
    write(t, "bad-not-ascii", b"REGISTER:/psm_\xff:shared_memory\n")
    write(t, "bad-json-nul", json_line("REGISTER", "shared_memory", b"/a\x00b"))
    write(t, "bad-json-base64", b'{"cmd":"REGISTER","rtype":"file","base64_name":"L3R=tcA"}\n')
    write(t, "bad-json-not-string", b'{"cmd":"REGISTER","rtype":3,"base64_name":"L3g="}\n')
    write(t, "bad-json-trailing", b'{"cmd":"PROBE","rtype":"noop"} x\n')
    write(t, "empty-line", b" \t\n")


# ---- cpython_wire ------------------------------------------------------------------------------

def frame(payload):
    return struct.pack(">i", len(payload)) + payload


def response(message, digest="sha256"):
    return b"{" + digest.encode() + b"}" + hmac.new(AUTHKEY, message, digest).digest()


def cpython_wire():
    t = "cpython_wire"
    clear(t)
    server_message = b"{sha256}" + SERVER_NONCE
    peer_challenge = CHALLENGE + b"{sha256}" + PEER_NONCE
    # steward as server: the client's side of a whole handshake, then a resource_sharer request.
    client_side = frame(response(server_message)) + frame(peer_challenge) + frame(b"#WELCOME#")
    write(t, "server-handshake-only", b"\x00" + client_side)
    for proto in (2, 3, 4, 5):
        write(t, "server-request-proto%d" % proto,
              b"\x00" + client_side + frame(pickle.dumps((0x0123456789ABCDEF0123456789ABCDEF, 4242), protocol=proto)))
    write(t, "server-request-small-key",
          b"\x00" + client_side + frame(pickle.dumps((7, 1), protocol=4)))
    write(t, "server-request-max-key-negative-pid",
          b"\x00" + client_side + frame(pickle.dumps((2**128 - 1, -(2**63)), protocol=4)))
    write(t, "server-stop-none", b"\x00" + client_side + frame(pickle.dumps(None, protocol=4)))
    write(t, "server-native-hello",
          b"\x00" + client_side + frame(b"\x01STWD" + struct.pack(">HHI", 1, 1, 0)))
    # Older and other digests.
    md5_client = frame(hmac.new(AUTHKEY, server_message, "md5").digest())
    legacy_peer = frame(CHALLENGE + PEER_NONCE[:20])
    write(t, "server-legacy-311-client",
          b"\x00" + md5_client + legacy_peer + frame(b"#WELCOME#") + frame(pickle.dumps((99, 12), protocol=4)))
    write(t, "server-sha3-384",
          b"\x00" + frame(response(server_message, "sha3_384"))
          + frame(CHALLENGE + b"{sha3_256}" + PEER_NONCE) + frame(b"#WELCOME#"))
    write(t, "server-md5-prefixed",
          b"\x00" + frame(response(server_message, "md5")) + frame(CHALLENGE + b"{md5}" + PEER_NONCE))
    # Refusals.
    write(t, "server-wrong-mac", b"\x00" + frame(b"{sha256}" + b"\x00" * 32))
    write(t, "server-unknown-digest", b"\x00" + frame(b"{sha1}" + b"\x00" * 20))
    write(t, "server-peer-failure",
          b"\x00" + frame(response(server_message)) + frame(peer_challenge) + frame(b"#FAILURE#"))
    write(t, "server-short-challenge",
          b"\x00" + frame(response(server_message)) + frame(CHALLENGE + b"short"))
    # steward as client: the server's side.
    client_message = b"{sha256}" + CLIENT_NONCE
    server_side = frame(peer_challenge) + frame(b"#WELCOME#") + frame(response(client_message))
    write(t, "client-handshake", b"\x01" + server_side)
    write(t, "client-legacy-server", b"\x01" + legacy_peer + frame(b"#WELCOME#") + frame(response(client_message)))
    write(t, "client-rejected", b"\x01" + frame(peer_challenge) + frame(b"#FAILURE#"))
    # Framing edges.
    write(t, "frame-long-form", b"\x00" + b"\xff\xff\xff\xff" + struct.pack(">Q", 3) + b"abc")
    write(t, "frame-4gib-length", b"\x00" + b"\xff\xff\xff\xff" + struct.pack(">Q", 4 << 30) + b"x" * 8)
    write(t, "frame-negative-length", b"\x00" + struct.pack(">i", -2) + b"xxxx")
    write(t, "frame-over-256", b"\x00" + struct.pack(">i", 257) + b"y" * 257)
    write(t, "frame-truncated", b"\x00" + struct.pack(">i", 60) + b"{sha256}")


# ---- native_frame ------------------------------------------------------------------------------

MAGIC = b"STWD"


def n_hello(lo=1, hi=1, flags=0):
    return b"\x01" + MAGIC + struct.pack(">HHI", lo, hi, flags)


def n_hello_ack(version=1, in_flight=64, max_payload=65536):
    return b"\x02" + MAGIC + struct.pack(">HII", version, in_flight, max_payload)


def n_fetch(rid, key):
    return b"\x03" + struct.pack(">QQQ", rid, key >> 64, key & (2**64 - 1))


def n_reply(rid, status, part_fds, total, index, count):
    return b"\x04" + struct.pack(">QBHIII", rid, status, part_fds, total, index, count)


def n_confirm(up_to, ids):
    return b"\x05" + struct.pack(">QI", up_to, len(ids)) + b"".join(struct.pack(">Q", i) for i in ids)


def n_give_back(rid, reason):
    return b"\x06" + struct.pack(">QB", rid, reason)


def n_error(code, text):
    return b"\x07" + struct.pack(">HH", code, len(text)) + text


QUICK_NONCE = bytes(range(0x40, 0x60))  # the client nonce native_frame_fuzz uses


def n_quick(lo, hi, flags, with_fetch, has_fetch=None):
    p = b"\x08" + MAGIC + struct.pack(">HHI", lo, hi, flags) + QUICK_NONCE
    p += bytes([(1 if with_fetch else 0) if has_fetch is None else has_fetch])
    if with_fetch:
        p += struct.pack(">Q", 7) + bytes.fromhex("0123456789abcdeffedcba9876543210")
    return p + hmac.new(AUTHKEY, b"steward quick v2 client" + p, "sha256").digest()


def n_quick_ack(version, in_flight, max_payload):
    p = b"\x09" + MAGIC + struct.pack(">HII", version, in_flight, max_payload)
    return p + hmac.new(AUTHKEY, b"steward quick v2 server" + QUICK_NONCE + p, "sha256").digest()


def ok_reply(rid, total):
    count = (total - 1) // 253 + 1
    return b"".join(frame(n_reply(rid, 0, min(253, total - 253 * i), total, i, count)) for i in range(count))


def native_frame():
    t = "native_frame"
    clear(t)
    client = (frame(n_hello()) + frame(n_fetch(1, 0x0123456789ABCDEF0123456789ABCDEF)) + frame(n_fetch(2, 5))
              + frame(n_confirm(1, [2])) + frame(n_give_back(3, 0)) + frame(n_error(4, b"shutting down")))
    server = (frame(n_hello_ack()) + ok_reply(1, 3) + frame(n_reply(2, 1, 0, 0, 0, 1)) + frame(n_reply(3, 2, 0, 0, 0, 1))
              + ok_reply(4, 300) + frame(n_reply(5, 3, 0, 0, 0, 1)))
    # Control byte: bit 7 clear (version 1), bits 0-1 descriptor mode, bits 2-6 read size.
    write(t, "client-session", bytes([16 << 2]) + client)
    write(t, "client-session-1-byte-reads", b"\x00" + client)
    write(t, "server-honest-fds", bytes([0x01 | (4 << 2)]) + server)
    write(t, "server-honest-fds-big-reads", bytes([0x01 | (31 << 2)]) + server)
    write(t, "server-hostile-fds", bytes([0x02 | (2 << 2)]) + server)
    write(t, "server-ctrunc", bytes([0x03 | (8 << 2)]) + server)
    write(t, "confirm-many", b"\x04" + frame(n_confirm(10, list(range(11, 200)))))
    write(t, "error-max-text", b"\x08" + frame(n_error(6, b"e" * 256)))
    write(t, "hello-version-range", b"\x00" + frame(n_hello(1, 7, 0)))
    # Refusals.
    write(t, "bad-reply-inconsistent", b"\x01" + frame(n_reply(1, 0, 2, 3, 0, 1)))
    write(t, "bad-request-id-0", b"\x00" + frame(n_fetch(0, 1)))
    write(t, "bad-confirm-count", b"\x00" + frame(n_confirm(0, [1, 2])[:-8]))
    write(t, "bad-error-too-long", b"\x00" + frame(n_error(1, b"e" * 257)))
    write(t, "bad-unknown-type", b"\x00" + frame(b"\x09abc"))
    write(t, "bad-over-limit", b"\x00" + struct.pack(">i", 65537) + b"\x03")
    write(t, "bad-negative-length", b"\x00" + b"\x80\x00\x00\x01")
    write(t, "bad-long-form-4gib", b"\x00" + b"\xff\xff\xff\xff" + struct.pack(">Q", 4 << 30))
    write(t, "bad-stray-fds", bytes([0x02]) + frame(n_fetch(1, 1)) + frame(n_fetch(2, 2)))

    # Version 2 (control bit 7): coalesced replies. Bits 0-1: 0 honest coalesced, 1 every batch
    # dropped, 2 hostile, 3 one part per call; bits 2-6 read size.
    v2 = 0x80
    many = b"".join(ok_reply(10 + i, 1 + i % 3) for i in range(40))
    coalesced = (frame(n_hello_ack(2)) + ok_reply(1, 2) + frame(n_reply(2, 1, 0, 0, 0, 1)) + ok_reply(3, 5)
                 + ok_reply(4, 600) + many + frame(n_reply(5, 2, 0, 0, 0, 1)))
    write(t, "v2-coalesced", bytes([v2 | (4 << 2)]) + coalesced)
    write(t, "v2-coalesced-big-reads", bytes([v2 | (31 << 2)]) + coalesced)
    write(t, "v2-coalesced-1-byte-reads", bytes([v2]) + coalesced)
    write(t, "v2-all-dropped", bytes([v2 | 0x01 | (8 << 2)]) + coalesced)
    write(t, "v2-hostile", bytes([v2 | 0x02 | (2 << 2)]) + coalesced)
    write(t, "v2-one-part-per-call", bytes([v2 | 0x03 | (16 << 2)]) + coalesced)
    write(t, "v2-quick-ack-frame-refused", bytes([v2 | (4 << 2)]) + frame(n_quick_ack(2, 64, 65536)) + ok_reply(1, 1))
    # QUICK / QUICK_ACK payloads: the whole stream after the control byte is decoded as each
    # (fixed authkey and nonce), with MACs from CPython's hmac.
    write(t, "quick-with-fetch", b"\x00" + n_quick(2, 2, 0, True))
    write(t, "quick-without-fetch", b"\x00" + n_quick(2, 2, 0, False))
    write(t, "quick-version-range", b"\x00" + n_quick(1, 9, 5, True))
    write(t, "quick-ack", b"\x00" + n_quick_ack(2, 64, 65536))
    write(t, "bad-quick-has-fetch-2", b"\x00" + n_quick(2, 2, 0, True, has_fetch=2))
    write(t, "bad-quick-max-version-1", b"\x00" + n_quick(1, 1, 0, False))
    bad_mac = bytearray(n_quick(2, 2, 0, True))
    bad_mac[-1] ^= 1
    write(t, "bad-quick-mac", b"\x00" + bytes(bad_mac))
    write(t, "bad-quick-ack-version-1", b"\x00" + n_quick_ack(1, 64, 65536))
    # What a quick-connect client reads first (quick::ack_reader): an optional challenge, then
    # QUICK_ACK and the frames behind it.
    challenge = frame(CHALLENGE + b"{sha256}" + SERVER_NONCE)
    write(t, "ack-reader-ack-then-reply", bytes([v2 | (4 << 2)]) + frame(n_quick_ack(2, 64, 65536)) + ok_reply(1, 1))
    write(t, "ack-reader-challenge-first", b"\x00" + challenge + frame(n_quick_ack(2, 64, 65536)) + ok_reply(1, 2))
    write(t, "ack-reader-two-challenges", b"\x00" + challenge + challenge + frame(n_quick_ack(2, 64, 65536)))
    write(t, "ack-reader-error-7", b"\x00" + frame(n_error(7, b"bad MAC")))
    write(t, "ack-reader-failure", b"\x00" + challenge + frame(b"#FAILURE#"))


# ---- share_id_text -----------------------------------------------------------------------------

def share_id_text():
    t = "share_id_text"
    clear(t)
    key = "0123456789abcdef0123456789abcdef"
    write(t, "doc-example", ("steward1:%s@/run/user/1000/steward-Xy1/s" % key).encode())
    write(t, "upper-hex-key", ("steward1:%s@/tmp/s" % key.upper()).encode())
    write(t, "percent-encoded", ("steward1:%s@/tmp/with%%20space/%%e2%%82%%ac/%%40at" % key).encode())
    write(t, "percent-literal", ("steward1:%s@%%2Ftmp%%2Fs" % key).encode())
    write(t, "max-address-107", ("steward1:%s@/%s" % (key, "a" * 106)).encode())
    write(t, "too-long-108", ("steward1:%s@/%s" % (key, "a" * 107)).encode())
    write(t, "escaped-108", ("steward1:%s@/%s%%41" % (key, "a" * 106)).encode())
    write(t, "all-literal-bytes",
          ("steward1:%s@/AZaz09/._-~+,=:" % ("f" * 32)).encode())
    write(t, "bad-no-at", ("steward1:%s/tmp/s" % key).encode())
    write(t, "bad-key-short", b"steward1:0123@/tmp/s")
    write(t, "bad-key-nonhex", ("steward1:%sg@/tmp/s" % key[:31]).encode())
    write(t, "bad-percent-end", ("steward1:%s@/tmp/%%4" % key).encode())
    write(t, "bad-nul", ("steward1:%s@/tmp/%%00x" % key).encode())
    write(t, "bad-relative", ("steward1:%s@tmp/s" % key).encode())
    write(t, "bad-space", ("steward1:%s@/tmp/a b" % key).encode())
    write(t, "bad-prefix", ("steward2:%s@/tmp/s" % key).encode())
    write(t, "decimal-max", str(2**128 - 1).encode())
    write(t, "decimal-overflow", str(2**128).encode())
    write(t, "decimal-leading-zeros", b"000000000000000000000000000000000000000000042")
    write(t, "hex-key-alone", key.upper().encode())
    write(t, "address-alone", b"/run/user/1000/steward-Xy1/s")


def main():
    for make in (tracker_line, cpython_wire, native_frame, share_id_text):
        make()
    return 0


if __name__ == "__main__":
    sys.exit(main())
