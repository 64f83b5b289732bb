"""Outbound-URL guard: the server only talks to public internet hosts on a user's behalf.

Two features make the server open connections to URLs that users choose: webhooks (`webhook_url`)
and `input_reference` image URLs. Without a guard either one is a server-side request forgery
hole: a user could point it at `http://169.254.169.254/` (cloud credentials), at Redis on
`127.0.0.1`, or at anything else on the private network the server sits in.

So before every connection we resolve the host ourselves, refuse the URL unless *every* address
it resolves to is globally routable, and then connect to the address we checked (pinning it), so
that a DNS answer that changes between the check and the connection ("DNS rebinding") cannot
slip a private address in. Redirects are never followed blindly: `fetch_limited` follows them
one hop at a time and checks each hop the same way.

Operators running a receiver on their own network opt in with `allow_private=True` (everything
allowed, as `TD_ALLOW_PRIVATE_WEBHOOKS` does) or, more narrowly, with `allow_networks` (only the
listed networks are let through besides public addresses).

This module imports neither torch nor FastAPI: workers and the API both use it.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union
from urllib.parse import unquote, urljoin, urlsplit

import httpx

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
NetworkSpec = Union[str, IPNetwork]

ALLOWED_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5
REDIRECT_STATUSES = (301, 302, 303, 307, 308)

# Ranges the stdlib's `is_private` / `is_global` flags do not name on their own, or where we want a
# precise word in the error message.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
"""RFC 1918 and unique-local IPv6: the stdlib's `is_private` also covers documentation and other
special ranges, which the final "not globally routable" check catches with a truer message."""
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UnsafeURLError(ValueError):
    """The URL is malformed or points at a host the server must not contact."""


class HostResolutionError(ValueError):
    """The host name did not resolve. Unlike `UnsafeURLError` this may be temporary."""


class FetchError(ValueError):
    """A guarded fetch failed: bad status, too many redirects, too large or too slow."""


def blocked_reason(ip: IPAddress) -> Optional[str]:
    """Why `ip` is not a public internet address (a short phrase for messages), or None if it is.

    IPv6 addresses that merely carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, 6to4
    `2002::/16`, NAT64 `64:ff9b::/96`) are judged by the IPv4 address they carry, so
    `::ffff:127.0.0.1` counts as loopback.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(embedded)
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local (includes cloud metadata endpoints)"),
        (ip in _CGNAT, "carrier-grade NAT (100.64.0.0/10)"),
        (ip.is_multicast, "multicast"),
        (any(ip in net for net in _PRIVATE if net.version == ip.version), "private"),
        (ip.is_reserved, "reserved"),
        (not ip.is_global, "not globally routable"),
    )
    for blocked, reason in checks:
        if blocked:
            return reason
    return None


@dataclass(frozen=True)
class CheckedURL:
    """A URL that passed the guard, with the addresses its host resolved to (all checked).

    `addresses` is empty when `allow_private` made resolution unnecessary; then connections go
    through the normal resolver.
    """

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...] = field(default=())


def check_public_url(url: str, allow_private: bool = False, *, allow_networks: Iterable[NetworkSpec] = ()) -> None:
    """Raise `ValueError` (`UnsafeURLError` or `HostResolutionError`) unless `url` is safe to contact.

    Safe means: http or https, a host, and every A/AAAA address of that host public (see
    `blocked_reason`) or inside one of `allow_networks`. With `allow_private` only the shape of
    the URL is checked.
    """
    resolve_url(url, allow_private, allow_networks=allow_networks)


def resolve_url(url: str, allow_private: bool = False, *, allow_networks: Iterable[NetworkSpec] = ()) -> CheckedURL:
    """`check_public_url`, returning what it found so the caller can connect to a checked address."""
    scheme, host, port = _split(url)
    if allow_private:
        return CheckedURL(url=url, scheme=scheme, host=host, port=port)
    networks = [ipaddress.ip_network(n, strict=False) if isinstance(n, str) else n for n in allow_networks]
    addresses = _resolve(host, port)
    for ip in addresses:
        if any(ip.version == net.version and ip in net for net in networks):
            continue
        reason = blocked_reason(ip)
        if reason is not None:
            shown = host if _is_ip_literal(host) else f"{host} (resolves to {ip})"
            raise UnsafeURLError(
                f"refusing to connect to {shown}: {reason} addresses are not allowed "
                "(only public internet hosts; an operator can allow private targets explicitly)"
            )
    return CheckedURL(url=url, scheme=scheme, host=host, port=port, addresses=tuple(addresses))


def _split(url: str) -> tuple[str, str, int]:
    """Scheme, host and port of `url`, or `UnsafeURLError` saying what is wrong with it."""
    if not isinstance(url, str) or not url.strip():
        raise UnsafeURLError("URL is empty")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise UnsafeURLError(f"malformed URL {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise UnsafeURLError(f"URL scheme must be http or https, got {parts.scheme or 'none'!r} in {url!r}")
    if not parts.hostname:
        raise UnsafeURLError(f"URL has no host: {url!r}")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80)


def _resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses of `host` (IP literals come back as themselves, without any DNS query).

    An IPv6 zone id (`fe80::1%25eth0` in a URL) is dropped for the lookup: it names an interface,
    not a different address, and only link-local addresses (refused anyway) carry one.
    """
    lookup = unquote(host).split("%", 1)[0]
    try:
        infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise HostResolutionError(f"cannot resolve host {host!r}: {exc}") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in addresses:
            addresses.append(ip)
    if not addresses:
        raise HostResolutionError(f"host {host!r} has no addresses")
    return addresses


@contextmanager
def open_checked(
    method: str,
    url: str,
    *,
    allow_private: bool = False,
    allow_networks: Iterable[NetworkSpec] = (),
    timeout: float = 10.0,
    headers: Optional[dict[str, str]] = None,
    content: Optional[bytes] = None,
) -> Iterator[httpx.Response]:
    """Send one request to `url` after checking it, and yield the (streaming, unread) response.

    Redirects are not followed. When the host was resolved, the connection goes to the first
    checked address, with the original host in the `Host` header and as the TLS server name, so
    certificates are still verified against the host name. Proxy environment variables are
    ignored: through a proxy the guard could not know where the connection really goes.
    """
    checked = resolve_url(url, allow_private, allow_networks=allow_networks)
    target = httpx.URL(checked.url)
    request_headers = dict(headers or {})
    extensions: dict[str, str] = {}
    if checked.addresses and not _is_ip_literal(checked.host):
        request_headers["Host"] = target.netloc.decode("ascii").rsplit("@", 1)[-1]
        target = target.copy_with(host=str(checked.addresses[0]))
        if checked.scheme == "https":
            extensions["sni_hostname"] = checked.host
    with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        request = client.build_request(method, target, headers=request_headers, content=content, extensions=extensions)
        response = client.send(request, stream=True)
        try:
            yield response
        finally:
            response.close()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(unquote(host).split("%", 1)[0])
    except ValueError:
        return False
    return True


def fetch_limited(
    url: str,
    max_bytes: int,
    timeout: float = 10.0,
    allow_private: bool = False,
    *,
    allow_networks: Iterable[NetworkSpec] = (),
    max_redirects: int = MAX_REDIRECTS,
) -> bytes:
    """GET `url` and return its body, refusing private targets on every redirect hop.

    Raises `UnsafeURLError` / `HostResolutionError` when a hop is refused, `FetchError` for a
    non-2xx final status, more than `max_redirects` redirects, a body over `max_bytes` (checked
    against Content-Length up front and while reading, so a lying or missing header does not
    help), or when the whole fetch takes longer than `timeout` seconds.
    """
    networks = tuple(allow_networks)
    deadline = time.monotonic() + timeout
    current = url
    for _hop in range(max_redirects + 1):
        with open_checked(
            "GET", current, allow_private=allow_private, allow_networks=networks, timeout=timeout
        ) as response:
            if response.status_code in REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"{current} answered {response.status_code} without a Location header")
                current = urljoin(current, location)
                continue
            if not 200 <= response.status_code < 300:
                raise FetchError(f"{current} answered HTTP {response.status_code}")
            return _read_limited(response, current, max_bytes, deadline, timeout)
    raise FetchError(f"more than {max_redirects} redirects starting from {url}")


def _read_limited(response: httpx.Response, url: str, max_bytes: int, deadline: float, timeout: float) -> bytes:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{url} is {int(declared)} bytes, more than the limit of {max_bytes} bytes")
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise FetchError(f"{url} sent more than the limit of {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise FetchError(f"fetching {url} took longer than {timeout:g} s")
    return bytes(body)
