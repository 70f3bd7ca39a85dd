"""Redis URLs for one server, a Sentinel set or a Cluster.

* ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``): one server.
* ``redis+sentinel://[:password@]host:port,host:port/service/db``: the Sentinels to
  ask for the current primary of ``service``; the password is the data nodes'.
* ``redis+cluster://[:password@]host:port,host:port``: startup nodes of a Cluster.
  Every lock's keys share one hash tag, so each script runs in a single slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

SINGLE = ("redis", "rediss", "unix")
SENTINEL = "redis+sentinel"
CLUSTER = "redis+cluster"
SCHEMES = (*SINGLE, SENTINEL, CLUSTER)
_HOST = re.compile(r"[A-Za-z0-9._:-]{1,253}")


@dataclass(frozen=True, slots=True)
class Topology:
    kind: str  # "single", "sentinel" or "cluster"
    nodes: tuple[tuple[str, int], ...]
    password: str | None
    service: str
    db: int


def parse(url: str) -> Topology:
    """Split a multi-host Redis URL; ValueError names what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}")
    if scheme in SINGLE:
        return Topology("single", (), None, "", 0)
    userinfo, at, hostpart = rest.rpartition("@")
    password = unquote(userinfo.partition(":")[2]) or None if at else None
    hosts, _, path = hostpart.partition("/")
    nodes = tuple(_node(item) for item in hosts.split(",") if item)
    if not nodes:
        raise ValueError("needs at least one host:port")
    if scheme == CLUSTER:
        if path.strip("/"):
            raise ValueError("a cluster URL takes no path: redis+cluster://h:p,h:p")
        return Topology("cluster", nodes, password, "", 0)
    service, _, db = path.partition("/")
    if not service:
        raise ValueError("needs the Sentinel service name: redis+sentinel://h:p/service/0")
    if (db and not db.isascii()) or (db and not db.isdigit()):
        raise ValueError(f"database ({db!r}) must be a number")
    if int(db or 0) > 1_000_000:
        raise ValueError(f"database ({db}) is out of range")
    return Topology("sentinel", nodes, password, unquote(service), int(db or 0))


def _node(item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 literal
    elif ":" in host:
        raise ValueError(f"node ({item!r}) must be host:port")
    if not sep or not _HOST.fullmatch(host) or not port.isascii() or not port.isdigit():
        raise ValueError(f"node ({item!r}) must be host:port")
    if not 0 < int(port) < 65536:
        raise ValueError(f"port ({port}) is out of range")
    return host, int(port)
