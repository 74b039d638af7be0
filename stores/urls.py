"""Video paths that are network inputs, and which of them refocus may open.

FFmpeg reads a protocol from the start of any path: a run of letters, digits, ``+``, ``-``
and ``.`` followed by ``:`` (``http://h/v.mp4``, but also ``concat:a|b``, ``file:/x``,
``tcp://h:1``, ``gopher://h``) or ``subfile,``. refocus therefore treats every such path as a
URL and opens it only when its scheme is allowed: http and https unless the user names more
(``--allow-scheme rtmp``). Hosts that are loopback, private, link-local or otherwise not
global addresses are refused unless allowed (``--allow-private-hosts``): a manifest from
elsewhere must not make refocus send requests to internal services. Names are checked here
as written (IP literals, ``localhost``); the decoder resolves names again before opening.

A local file whose name holds such a prefix is written with a leading ``./`` or as an
absolute path. This module is pure parsing: no network access.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

SCHEMES = ("http", "https")  # allowed unless the user names more
TIMEOUT = 30.0  # seconds to connect, and to wait for each read
MAX_DOWNLOAD_MB = 4096.0  # a network video larger than this is refused or stopped

_PREFIX = re.compile(r"([A-Za-z0-9+.-]+):")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


@dataclass(frozen=True)
class NetworkSettings:
    """What network inputs may be opened, and how long and how much to read from them."""

    schemes: tuple[str, ...] = SCHEMES
    allow_private_hosts: bool = False
    timeout: float = TIMEOUT
    max_download_mb: float = MAX_DOWNLOAD_MB

    def __post_init__(self) -> None:
        schemes = tuple(dict.fromkeys(s.lower() for s in self.schemes))
        bad = [s for s in schemes if not _SCHEME.fullmatch(s)]
        if bad:
            raise ValueError(f"not a URL scheme: {bad[0]!r}")
        object.__setattr__(self, "schemes", schemes)
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if not self.max_download_mb > 0:
            raise ValueError(f"max_download_mb must be positive, got {self.max_download_mb}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_download_mb * 1024 * 1024)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "schemes": list(self.schemes)}


def scheme_of(path: str) -> str | None:
    """The protocol FFmpeg would read ``path`` with (lower case), or None for a local file."""
    if path.startswith("subfile,"):
        return "subfile"
    match = _PREFIX.match(path)
    return match.group(1).lower() if match else None


def is_url(path: str) -> bool:
    return scheme_of(path) is not None


def internal_address(address: str) -> bool:
    """Whether an IP address (any form ``inet_aton`` or ``ipaddress`` reads) is not a global
    one: loopback, private, link-local, shared, reserved, unspecified or multicast."""
    text = address.split("%", 1)[0]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text)
    except ValueError:
        ip = ipaddress.IPv4Address(socket.inet_aton(text))  # 127.1, 0x7f000001, 2130706433
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def literal_address(host: str) -> bool:
    """Whether ``host`` is written as an IP address rather than a name."""
    text = host.split("%", 1)[0]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        try:
            socket.inet_aton(text)
        except OSError:
            return False
    return True


def _private_host_problem(host: str) -> str | None:
    name = host.rstrip(".").lower()
    internal = name == "localhost" or name.endswith(".localhost") or (
        literal_address(name) and internal_address(name))
    if not internal:
        return None
    return (f"host {host!r} is a loopback, private or link-local address "
            "(internal hosts are refused; --allow-private-hosts allows them)")


def url_problem(path: str, settings: NetworkSettings) -> str | None:
    """Why ``path`` may not be opened under ``settings`` (one line), or None when it may
    (local files always may, as far as this module is concerned)."""
    scheme = scheme_of(path)
    if scheme is None:
        return None
    if scheme not in settings.schemes:
        local = "" if "://" in path else "; write a local file as ./NAME"
        return (f"scheme {scheme!r} is not allowed (allowed: {', '.join(settings.schemes)}; "
                f"--allow-scheme {scheme} allows it{local})")
    try:
        parts = urlsplit(path)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as e:
        return f"not a valid URL ({e})"
    if "://" in path and not host:
        return "URL has no host"
    if host and not settings.allow_private_hosts:
        return _private_host_problem(host)
    return None
