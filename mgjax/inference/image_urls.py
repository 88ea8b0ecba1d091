"""Images fetched from http(s) URLs for the server (``--allow-image-urls``), from public addresses only.

The host is resolved once and every address it resolves to is checked (loopback, private, link-local, multicast,
reserved, unspecified and other non-global addresses are refused; IPv4-mapped IPv6 unwrapped first); the connection
goes to a checked address, so a DNS answer that changes in between (rebinding) cannot send it elsewhere, and TLS
still verifies the certificate against the host's name. Redirects are followed up to ``REDIRECTS``, each checked as
the URL itself was; the body is capped in bytes and the whole fetch in seconds. Every refusal is a ``Refused``
naming the request's part (``where``) and the reason.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse


class Refused(ValueError):
    """An image URL the server does not fetch, or a fetch that failed; the message names the request's part."""


REDIRECTS = 3  # redirects an image URL may take, each checked as the URL itself was
NOT_PUBLIC = ("unspecified", "loopback", "link_local", "multicast", "private", "reserved")


def fetch_image(url: str, where: str, *, limit: int, timeout: float, private: bool = False) -> bytes:
    """The body of an http(s) image URL, at most ``limit`` bytes within ``timeout`` seconds (resolving, connecting,
    redirects and reading together; a name server that does not answer waits out the system resolver's own
    timeout). Only public addresses are fetched from unless ``private``: a client must not reach the server's own
    network (a cloud's metadata service at 169.254.169.254, an admin page on localhost) through it."""
    deadline = time.monotonic() + timeout
    for _ in range(REDIRECTS + 1):
        data, location = _get(url, where, limit, deadline, private)
        if location is None:
            return data
        url = urllib.parse.urljoin(url, location)
    raise Refused(f"{where}: the image URL redirects more than {REDIRECTS} times")


def _get(url: str, where: str, limit: int, deadline: float, private: bool) -> tuple[bytes, str | None]:
    """One GET: (the body, None), or (b"", where it redirects to)."""
    parts = urllib.parse.urlsplit(url)
    try:
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL")
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:  # a redirect elsewhere (file:, ftp:), or a port that is not a number
        raise Refused(f"{where}: the image URL {url[:80]!r} is refused ({e})") from None
    addresses = _resolve(parts.hostname, port, where, private)
    https = parts.scheme == "https"
    try:
        with _open(parts.hostname, port, addresses, https, deadline) as sock:
            conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(parts.hostname, port)
            conn.sock = sock  # connected already: http.client sends through it and looks nothing up
            conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), headers=HEADERS)
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                return b"", response.getheader("Location")
            if response.status != 200:
                raise Refused(f"{where}: the image URL answered {response.status} {response.reason}")
            return _read(response, sock, limit, deadline, where), None
    except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, a TLS failure, a garbled answer
        raise Refused(f"{where}: the image URL could not be fetched ({type(e).__name__}: {e})") from None


def _open(host: str, port: int, addresses: list[str], https: bool, deadline: float) -> socket.socket:
    """A connection to an address checked already, never to a second look-up of ``host`` (whose answer may have
    changed since: DNS rebinding); TLS still verifies the certificate against ``host``."""
    sock = _connect(addresses, port, _left(deadline))
    return ssl.create_default_context().wrap_socket(sock, server_hostname=host) if https else sock


HEADERS = {"User-Agent": "mgjax-serve", "Accept": "image/*"}


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("out of time")
    return left


def _resolve(host: str, port: int, where: str, private: bool) -> list[str]:
    """Every address ``host`` resolves to, each one public unless ``private`` (one bad address refuses them all:
    which one a connection would use is not the client's to choose)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise Refused(f"{where}: the image URL's host {host!r} does not resolve ({e})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    for address in [] if private else addresses:
        why = _not_public(ipaddress.ip_address(address))
        if why:
            raise Refused(
                f"{where}: the image URL's host {host!r} is a {why} address ({address}); this server fetches images "
                "from public addresses only"
            )
    return addresses


def _not_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What kind of address ``address`` is when it is not a public one (None: public)."""
    if address.version == 6 and address.ipv4_mapped:  # ::ffff:127.0.0.1 is 127.0.0.1
        address = address.ipv4_mapped
    for kind in NOT_PUBLIC:
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"  # shared (100.64.0.0/10), documentation, benchmarking ...


def _connect(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """A connection to the first of ``addresses`` that answers."""
    error: OSError = OSError("no address")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as e:
            error = e
    raise error


def _read(response: http.client.HTTPResponse, sock: socket.socket, limit: int, deadline: float, where: str) -> bytes:
    """The response's body, refused past ``limit`` bytes; each read waits only the time left (a server that sends
    a byte a second would otherwise hold a worker thread indefinitely)."""
    declared = response.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Refused(f"{where}: the image has {declared} bytes, over this server's {limit}")
    data = bytearray()
    while len(data) <= limit:
        sock.settimeout(_left(deadline))
        chunk = response.read1(1 << 16)
        if not chunk:
            return bytes(data)
        data += chunk
    raise Refused(f"{where}: the image is over this server's {limit} bytes")
