#!/usr/bin/env python3
"""Writes a starting corpus for each fuzz target into DIR/<target>/ (scripts/fuzz runs it):
well-formed inputs that libFuzzer mutates from, so it does not have to discover a TLS
ClientHello or a multipart body from nothing. Each input starts with the byte that seeds how
`cove_fuzz::split` cuts it (see fuzz/src/lib.rs)."""

import json
import os
import ssl
import struct
import sys


def client_hellos():
    """Real ClientHellos from Python's TLS stack: with SNI and ALPN, and with neither."""
    for sni, alpn in (("api.example.com", ["h2", "http/1.1"]), (None, None), ("A.Example.ORG.", ["x"])):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        if alpn:
            ctx.set_alpn_protocols(alpn)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        yield outgoing.read()


def frame(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack(">II", len(h), len(data)) + h + data


def frames():
    yield frame({"id": 1, "op": "stat", "mount": "m1", "path": "a/b.txt"})
    yield frame({"id": 2, "op": "read", "mount": "m1", "path": "x", "offset": 4096, "len": 65536}) + frame(
        {"id": 0, "hello": "n", "protocol": 1}
    )
    yield frame({"id": 3, "errno": 0, "entries": [{"name": "f", "kind": "file", "size": 3, "mtime": 0}]}, b"abc")
    yield b"COVE-HELLO 1 00000000deadbeef\n"


def uploads():
    def part(name: str, body: bytes, star: bool = False) -> bytes:
        disposition = f"name*=utf-8''{name}" if star else f'name="{name}"'
        return f'--XyZ\r\nContent-Disposition: form-data; {disposition}; filename="f"\r\n\r\n'.encode() + body + b"\r\n"

    yield part("/home/user/a.txt", b"hello") + part("%2Ftmp%2Fb", b"\x00\x01" * 40, star=True) + b"--XyZ--\r\n"
    yield part("rel/path", b"") + b"--XyZ--\r\n"
    yield b"multipart/form-data; boundary=\"q q\"\n--q q\r\nContent-Disposition: form-data; name=\"p\"\r\n\r\nv\r\n--q q--\r\n"


def images():
    yield bytes([1, 0]) + b"page" * 1024  # packed and unpacked
    yield bytes([2, 1]) + bytes(range(256)) * 20  # packed, one blob byte changed
    # A table of one raw chunk of 4 bytes (crc32 of b"abcd") and its blob.
    table = struct.pack("<I", 4) + bytes([1, 0]) + (4).to_bytes(3, "little") + (4).to_bytes(3, "little")
    yield bytes([0]) + table + struct.pack("<I", 0xED82CD11) + bytes([0]) + b"abcd"


def main():
    out = sys.argv[1]
    for target, inputs in (("client_hello", client_hellos()), ("frames", frames()),
                           ("multipart", uploads()), ("image", images())):
        os.makedirs(os.path.join(out, target), exist_ok=True)
        for i, data in enumerate(inputs):
            # The first byte seeds the cuts; the image target reads it as its mode instead.
            body = data if target == "image" else bytes([i * 37 % 256]) + data
            with open(os.path.join(out, target, f"seed-{i}"), "wb") as f:
                f.write(body)


if __name__ == "__main__":
    main()
