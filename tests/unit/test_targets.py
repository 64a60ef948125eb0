"""`--server` forms: one address, a list (names resolved to IPs for gRPC), gRPC targets as given."""

from __future__ import annotations

from edgecut.edge.targets import channel_target


def test_one_address_is_passed_through() -> None:
    assert channel_target("tail.example:50051") == ("tail.example:50051", 1)


def test_a_list_becomes_a_grpc_address_list() -> None:
    assert channel_target("127.0.0.1:5001, localhost:5002") == ("ipv4:127.0.0.1:5001,127.0.0.1:5002", 2)


def test_grpc_targets_are_kept() -> None:
    assert channel_target("ipv4:127.0.0.1:5001,127.0.0.1:5002,127.0.0.1:5003")[1] == 3
    target, n = channel_target("dns:///localhost:5001")
    assert target == "dns:///localhost:5001" and n >= 1
