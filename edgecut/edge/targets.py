"""What `--server` may name: one tail service, several replicas, or a name that resolves to many.

gRPC balances over an address list with its `round_robin` policy, but its `ipv4:`/`ipv6:` lists
take IP addresses only; a list of host names is resolved here once, at connect time. A `dns:///`
target is left to gRPC (it re-resolves), and only counted here.
"""

from __future__ import annotations

import socket


def channel_target(server: str) -> tuple[str, int]:
    """(gRPC target, replicas expected) for `--server`: HOST:PORT, a comma-separated list of them,
    or a gRPC target (`ipv4:`, `ipv6:`, `dns:///`). A list of names is resolved here, because
    gRPC's address lists take IP addresses only."""
    if server.startswith(("ipv4:", "ipv6:")):
        return server, len(server.split(":", 1)[1].split(","))
    if server.startswith("dns:"):
        host, _, port = server.rsplit("/", 1)[-1].rpartition(":")
        return server, len(_resolve(host, port)) or 1
    parts = [p.strip() for p in server.split(",") if p.strip()]
    if len(parts) <= 1:
        return server, 1
    addresses = []
    for part in parts:
        host, _, port = part.rpartition(":")
        addresses += _resolve(host.strip("[]"), port) or [part]
    v4 = [a for a in dict.fromkeys(addresses) if not a.startswith("[")]
    if v4:  # one scheme per list: IPv4 where every name has one
        return f"ipv4:{','.join(v4)}", len(v4)
    v6 = list(dict.fromkeys(addresses))
    return f"ipv6:{','.join(v6)}", len(v6)


def _resolve(host: str, port: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    out = []
    for family, _, _, _, addr in infos:
        ip, port_number = str(addr[0]), int(addr[1])
        out.append(f"[{ip}]:{port_number}" if family == socket.AF_INET6 else f"{ip}:{port_number}")
    return list(dict.fromkeys(out))
