"""What the tests of the in-sandbox services share: a `cove server` the SDK reaches as a user
would, and a PNG reader.

The SDK calls a service at `https://<sandbox id>.<sandbox domain>` with no port, so the
`tls_server` fixture starts a `cove server` the way a local user would: `--tls-self-signed` on
port 443 of a loopback address of its own, with `sandbox.cove.invalid` as the sandbox domain.
The client trusts the server's CA through `SSL_CERT_FILE` (honoured by httpx), and names below
the sandbox domain resolve to that address as a wildcard DNS record would (a resolver wrapper in
this process: the only thing these tests add between the SDK and the server).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import zlib

import pytest

from leap0 import Leap0Client
from test_leap0_sdk import SANDBOX_DOMAIN, CoveServer, delete_leftovers


def free_loopback_443() -> str:
    """A 127.x.y.z address whose port 443 is free."""
    for _ in range(50):
        ip = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
        with socket.socket() as s:
            try:
                s.bind((ip, 443))
            except OSError:
                continue
        return ip
    raise RuntimeError("no loopback address with a free port 443")


@pytest.fixture(scope="module")
def tls_server():
    ip = free_loopback_443()
    real_getaddrinfo = socket.getaddrinfo

    def wildcard_dns(host, *args, **kwargs):
        if isinstance(host, str) and host.rstrip(".").endswith("." + SANDBOX_DOMAIN):
            host = ip
        return real_getaddrinfo(host, *args, **kwargs)

    srv = CoveServer(["--tls-self-signed", "--sandbox-domain", SANDBOX_DOMAIN], listen=f"{ip}:443")
    saved_cert_file = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = str(srv.data_dir / "tls" / "ca.pem")
    socket.getaddrinfo = wildcard_dns
    try:
        assert srv.base_url == f"https://{ip}:443", srv.base_url
        yield srv
    finally:
        socket.getaddrinfo = real_getaddrinfo
        if saved_cert_file is None:
            os.environ.pop("SSL_CERT_FILE", None)
        else:
            os.environ["SSL_CERT_FILE"] = saved_cert_file
        srv.stop()


@pytest.fixture(scope="module")
def tls_client(tls_server):
    c = Leap0Client(
        api_key=tls_server.api_key,
        base_url=tls_server.base_url,
        sandbox_domain=SANDBOX_DOMAIN,
        timeout=300.0,
        sdk_otel_enabled=False,
    )
    yield c
    delete_leftovers(c)
    c.close()


def png_summary(data: bytes) -> tuple[int, int, int]:
    """Width, height and the number of distinct byte values of the decompressed pixel rows of
    a PNG; fails unless it is one."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, width, height, idat = 8, 0, 0, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))
