"""The outbound-URL guard: which addresses are refused, and guarded fetches against real local
HTTP servers. Everything runs offline: IP literals, `localhost`, and servers on 127.0.0.1/127.0.0.2."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server.netguard import (
    FetchError,
    HostResolutionError,
    UnsafeURLError,
    check_public_url,
    fetch_limited,
    open_checked,
)

REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.8.9.10:8080/x", "loopback"),
    ("http://localhost:6379/", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 wrapping 127.0.0.1
    ("http://2130706433/", "loopback"),  # 127.0.0.1 written as one decimal number
    ("http://0.0.0.0/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://10.1.2.3/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1%25eth0]/", "link-local"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://224.0.0.251/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("https://192.0.2.10/", "not globally routable"),  # TEST-NET-1, documentation only
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_internal_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURLError, match=reason):
        check_public_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://93.184.216.34/", "https://93.184.216.34:8443/hook?x=1", "http://[2606:4700::1111]/",
     "http://[64:ff9b::5db8:d822]/"],  # the last: NAT64 wrapping the public 93.184.216.34
)
def test_public_ip_literals_are_accepted(url: str) -> None:
    check_public_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://93.184.216.34/", "http or https"), ("file:///etc/passwd", "http or https"),
     ("93.184.216.34/hook", "http or https"), ("http:///hook", "no host"), ("http://93.184.216.34:99999/", "Port"),
     ("", "empty")],
)
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(UnsafeURLError, match=message):
        check_public_url(url)


def test_errors_are_value_errors_and_unresolvable_hosts_say_so() -> None:
    with pytest.raises(HostResolutionError, match="cannot resolve"):
        check_public_url("http://no-such-host.invalid/")
    assert issubclass(UnsafeURLError, ValueError) and issubclass(HostResolutionError, ValueError)
    assert issubclass(FetchError, ValueError)


def test_allow_private_and_allow_networks_open_exactly_what_they_say() -> None:
    check_public_url("http://127.0.0.1/", allow_private=True)
    check_public_url("http://no-such-host.invalid/", allow_private=True)  # nothing to resolve when all is allowed
    check_public_url("http://10.0.0.5/", allow_networks=["10.0.0.0/24"])
    with pytest.raises(UnsafeURLError, match="private"):
        check_public_url("http://10.0.1.5/", allow_networks=["10.0.0.0/24"])
    with pytest.raises(UnsafeURLError, match="scheme"):
        check_public_url("gopher://127.0.0.1/", allow_private=True)


# ------------------------------------------------------------------------------------------------
# Guarded fetches against real local servers
# ------------------------------------------------------------------------------------------------
Route = Callable[[BaseHTTPRequestHandler], None]


@contextmanager
def serve(host: str, route: Route) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An HTTP server on `host` whose GET handler is `route`; yields its base URL and the headers of
    every request it received."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append({k.lower(): v for k, v in self.headers.items()} | {"path": self.path})
            route(self)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def reply(status: int, body: bytes = b"", headers: dict[str, str] | None = None, length: bool = True) -> Route:
    def route(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if length:
            handler.send_header("content-length", str(len(body)))
        else:
            handler.close_connection = True
        handler.end_headers()
        handler.wfile.write(body)

    return route


def test_fetch_returns_the_body_and_follows_safe_redirects() -> None:
    def route(handler: BaseHTTPRequestHandler) -> None:
        if handler.path == "/start":
            reply(302, headers={"location": "/image.png"})(handler)
        else:
            reply(200, b"\x89PNG...")(handler)

    with serve("127.0.0.1", route) as (base, seen):
        assert fetch_limited(base + "/start", max_bytes=100, allow_private=True) == b"\x89PNG..."
    assert [r["path"] for r in seen] == ["/start", "/image.png"]


def test_redirect_to_a_private_address_is_refused_before_connecting() -> None:
    # Only 127.0.0.1 is let through (as an operator could allow one internal host); the first hop
    # there redirects to 127.0.0.2, which the guard must refuse without ever connecting to it.
    with serve("127.0.0.2", reply(200, b"secret")) as (target, target_seen):
        with serve("127.0.0.1", reply(302, headers={"location": target + "/latest/meta-data/"})) as (base, seen):
            with pytest.raises(UnsafeURLError, match="127.0.0.2.*loopback"):
                fetch_limited(base + "/img", max_bytes=1000, allow_networks=["127.0.0.1/32"])
    assert len(seen) == 1
    assert target_seen == []


def test_first_hop_to_loopback_is_refused_without_a_request() -> None:
    with serve("127.0.0.1", reply(200, b"x")) as (base, seen):
        with pytest.raises(UnsafeURLError, match="loopback"):
            fetch_limited(base + "/", max_bytes=10)
    assert seen == []


def test_fetch_stops_past_max_bytes_with_or_without_content_length() -> None:
    with serve("127.0.0.1", reply(200, b"a" * 5000)) as (base, _):
        with pytest.raises(FetchError, match="5000 bytes, more than the limit of 1000"):
            fetch_limited(base + "/", max_bytes=1000, allow_private=True)
    with serve("127.0.0.1", reply(200, b"a" * 50000, length=False)) as (base, _):
        with pytest.raises(FetchError, match="more than the limit of 1000 bytes"):
            fetch_limited(base + "/", max_bytes=1000, allow_private=True)


def test_fetch_reports_bad_status_and_redirect_loops() -> None:
    with serve("127.0.0.1", reply(404)) as (base, _):
        with pytest.raises(FetchError, match="HTTP 404"):
            fetch_limited(base + "/missing", max_bytes=10, allow_private=True)
    with serve("127.0.0.1", reply(307, headers={"location": "/again"})) as (base, seen):
        with pytest.raises(FetchError, match="more than 2 redirects"):
            fetch_limited(base + "/", max_bytes=10, allow_private=True, max_redirects=2)
    assert len(seen) == 3


def test_connection_is_pinned_to_the_checked_address_and_keeps_the_host_name() -> None:
    with serve("127.0.0.1", reply(204)) as (base, seen):
        port = base.rsplit(":", 1)[1]
        with open_checked("GET", f"http://localhost:{port}/ping", allow_networks=["127.0.0.0/8"]) as response:
            assert response.status_code == 204
            assert response.url.host == "127.0.0.1"  # connected to the address that was checked
    assert seen[0]["host"] == f"localhost:{port}"
