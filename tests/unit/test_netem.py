"""The link emulator, over real sockets on 127.0.0.1: bytes, pacing, delay, resets, gRPC."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress

import grpc
import pytest

from edgecut.errors import UsageError
from edgecut.netem import (
    LinkConfig,
    LinkEmulator,
    LinkStats,
    ThreadedLinkEmulator,
    parse_address,
    parse_bandwidth,
    parse_duration_ms,
    run_netem,
)

Address = tuple[str, int]


# --- servers on the far side of the link ---------------------------------------------------


@contextmanager
def tcp_server(handle: Callable[[socket.socket], None]) -> Iterator[Address]:
    """A threaded TCP server calling `handle(conn)` per connection; yields its address."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            with suppress(OSError):  # the emulator resetting connections is part of the tests
                handle(self.request)

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    with Server(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        host, port = server.server_address[:2]
        yield str(host), port
        server.shutdown()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def send_after_go(nbytes: int) -> Callable[[socket.socket], None]:
    def source(conn: socket.socket) -> None:
        conn.recv(1)
        conn.sendall(bytes(nbytes))
        conn.shutdown(socket.SHUT_WR)

    return source


def recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    chunks, received = [], 0
    while received < nbytes:
        data = sock.recv(min(1 << 20, nbytes - received))
        if not data:
            raise ConnectionError(f"EOF after {received} of {nbytes} bytes")
        chunks.append(data)
        received += len(data)
    return b"".join(chunks)


def echo_round_trip(sock: socket.socket, payload: bytes) -> bytes:
    """Send and receive concurrently, so a big payload cannot deadlock on full buffers."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    received = recv_exactly(sock, len(payload))
    sender.join()
    return received


def wait_for(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def assert_reset_or_eof(sock: socket.socket) -> None:
    sock.settimeout(2.0)
    with suppress(ConnectionResetError):
        assert sock.recv(1024) == b""


@contextmanager
def through_link(target: Address, config: LinkConfig) -> Iterator[tuple[ThreadedLinkEmulator, socket.socket]]:
    """An emulator in front of `target` and one client connection through it."""
    emulator = ThreadedLinkEmulator(target, config)
    with emulator as proxy, socket.create_connection(proxy) as sock:
        yield emulator, sock


@pytest.fixture
def echo_server() -> Iterator[Address]:
    with tcp_server(echo) as address:
        yield address


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "bps"),
    [
        ("8mbit", 8e6),
        ("0.5mbit", 5e5),
        ("512kbit", 512e3),
        ("1gbit", 1e9),
        ("100000bit", 1e5),
        (" 8 Mbit ", 8e6),
        ("8mbit/s", 8e6),
        (".5kbit", 500.0),
    ],
)
def test_parse_bandwidth_accepts_tc_units(text: str, bps: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bps)


def test_parse_bandwidth_points_bytes_units_at_bits() -> None:
    with pytest.raises(UsageError) as caught:
        parse_bandwidth("8mbps")
    assert "bit, kbit, mbit, gbit" in str(caught.value)
    assert caught.value.hint == "use mbit (megabits per second), e.g. 8mbit"


@pytest.mark.parametrize("text", ["", "fast", "8", "8 MB", "-1mbit", "0mbit", "1e6bit", "8kibit"])
def test_parse_bandwidth_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="bandwidth"):
        parse_bandwidth(text)


@pytest.mark.parametrize(
    ("text", "ms"), [("40ms", 40.0), ("0.04s", 40.0), ("40", 40.0), ("500us", 0.5), ("0", 0.0)]
)
def test_parse_duration(text: str, ms: float) -> None:
    assert parse_duration_ms(text) == pytest.approx(ms)


@pytest.mark.parametrize("text", ["", "-5ms", "40 minutes", "forty"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="ms, s or us"):
        parse_duration_ms(text)


def test_link_config_parse_is_symmetric_and_none_is_unlimited() -> None:
    assert LinkConfig.parse("8mbit", "40ms") == LinkConfig(up_bps=8e6, down_bps=8e6, rtt_ms=40.0)
    assert LinkConfig.parse(None) == LinkConfig()


@pytest.mark.parametrize(
    "fields",
    [
        {"up_bps": 0.0},
        {"down_bps": -1.0},
        {"rtt_ms": -1.0},
        {"reset_prob": 1.5},
        {"burst_bytes": 0},
        {"up_bps": float("inf")},
    ],
)
def test_link_config_rejects_impossible_links(fields: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        LinkConfig(**fields)  # type: ignore[arg-type]


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ("127.0.0.1", ":80", "host:port", "host:70000"):
        with pytest.raises(UsageError, match="host:port"):
            parse_address(bad)


# --- bytes, pace, delay ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [LinkConfig(), LinkConfig(up_bps=50e6, down_bps=20e6, rtt_ms=10)])
def test_bytes_pass_unchanged_both_ways(echo_server: Address, config: LinkConfig) -> None:
    payload = os.urandom(300_000)
    with through_link(echo_server, config) as (_, s):
        assert echo_round_trip(s, payload) == payload


def test_download_is_limited() -> None:
    nbytes = 125_000  # 1.0 s at 1 Mbit/s, 0.87 s after the bucket's first 16 KiB
    one_mbit_down = LinkConfig(down_bps=1e6)
    with tcp_server(send_after_go(nbytes)) as src, through_link(src, one_mbit_down) as (_, s):
        start = time.monotonic()
        s.sendall(b"g")
        recv_exactly(s, nbytes)
        assert 0.7 <= time.monotonic() - start <= 2.0


def test_upload_is_limited(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig(up_bps=1e6)) as (_, s):
        start = time.monotonic()
        echo_round_trip(s, bytes(125_000))
        assert 0.7 <= time.monotonic() - start <= 2.0


def test_connections_share_the_link() -> None:
    nbytes = 62_500  # two of these at 1 Mbit/s take as long as one of twice the size
    one_mbit_down = LinkConfig(down_bps=1e6)
    with tcp_server(send_after_go(nbytes)) as src, ThreadedLinkEmulator(src, one_mbit_down) as proxy:
        socks = [socket.create_connection(proxy) for _ in range(2)]
        start = time.monotonic()
        for s in socks:
            s.sendall(b"g")
        readers = [threading.Thread(target=recv_exactly, args=(s, nbytes)) for s in socks]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join()
        assert 0.7 <= time.monotonic() - start <= 2.0
        for s in socks:
            s.close()


def test_delay_does_not_add_up_per_chunk() -> None:
    nbytes = 250_000  # 0.2 s at 10 Mbit/s in 5 KB chunks: 50 chunks, 5 s if each waited 100 ms
    link = LinkConfig.parse("10mbit", "200ms")
    with tcp_server(send_after_go(nbytes)) as src, through_link(src, link) as (_, s):
        start = time.monotonic()
        s.sendall(b"g")
        recv_exactly(s, nbytes)
        assert 0.3 <= time.monotonic() - start <= 0.8  # 200 ms RTT + 0.19 s on the wire


def test_rtt_is_added(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig(rtt_ms=50)) as (_, s):
        samples = []
        for _ in range(5):
            start = time.monotonic()
            echo_round_trip(s, b"ping")
            samples.append(time.monotonic() - start)
    assert 0.050 <= statistics.median(samples) <= 0.080


def test_set_config_speeds_up_a_transfer_in_flight() -> None:
    nbytes = 400_000  # 3.2 s at 1 Mbit/s
    one_mbit_down = LinkConfig(down_bps=1e6)
    with tcp_server(send_after_go(nbytes)) as src, through_link(src, one_mbit_down) as (link, s):
        start = time.monotonic()
        s.sendall(b"g")
        threading.Timer(0.3, link.set_config, args=(LinkConfig(),)).start()
        recv_exactly(s, nbytes)
        assert time.monotonic() - start < 1.5


def test_set_config_slows_down_an_open_connection(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig.parse("100mbit")) as (emulator, s):
        start = time.monotonic()
        echo_round_trip(s, bytes(125_000))
        assert time.monotonic() - start < 0.5
        emulator.set_config(LinkConfig.parse("1mbit"))
        start = time.monotonic()
        echo_round_trip(s, bytes(125_000))
        assert time.monotonic() - start >= 0.7


# --- resets, stats, shutdown ----------------------------------------------------------------


def test_reset_all_drops_connections_but_keeps_listening(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig()) as (emulator, s):
        proxy = s.getpeername()
        assert echo_round_trip(s, b"hello") == b"hello"
        emulator.reset_all()
        assert_reset_or_eof(s)
        assert emulator.stats.resets == 1
        with socket.create_connection(proxy) as again:
            assert echo_round_trip(again, b"again") == b"again"


def test_reset_prob_one_resets_on_first_chunk(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig(reset_prob=1.0)) as (emulator, s):
        s.sendall(b"doomed")
        assert_reset_or_eof(s)
        wait_for(lambda: emulator.stats.resets == 1)


def test_unreachable_target_resets_the_client() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]
    with through_link(("127.0.0.1", closed_port), LinkConfig()) as (_, s):
        assert_reset_or_eof(s)


def test_stats_count_delivered_bytes(echo_server: Address) -> None:
    with through_link(echo_server, LinkConfig(rtt_ms=2)) as (emulator, s):
        echo_round_trip(s, bytes(10_000))
        wait_for(lambda: emulator.stats.bytes_up == emulator.stats.bytes_down == 10_000)
        s.close()
        wait_for(lambda: emulator.stats.active == 0)
        assert emulator.stats == LinkStats(bytes_up=10_000, bytes_down=10_000, connections=1)


def test_half_close_is_passed_on() -> None:
    def answer_after_eof(conn: socket.socket) -> None:
        request = b""
        while data := conn.recv(1024):
            request += data
        conn.sendall(request.upper())

    with tcp_server(answer_after_eof) as server, through_link(server, LinkConfig()) as (_, s):
        s.sendall(b"question")
        s.shutdown(socket.SHUT_WR)
        assert recv_exactly(s, 8) == b"QUESTION"
        assert s.recv(1) == b""


def test_stop_closes_connections_and_leaves_no_task(echo_server: Address) -> None:
    async def scenario() -> None:
        emulator = LinkEmulator(echo_server, LinkConfig(up_bps=1e6, rtt_ms=20))
        reader, writer = await asyncio.open_connection(*await emulator.start())
        writer.write(b"x" * 50_000)  # keeps the pacing and delivery tasks busy
        await asyncio.sleep(0.1)
        assert emulator.stats.active == 1
        await emulator.stop()
        assert emulator.stats.active == 0
        assert asyncio.all_tasks() == {asyncio.current_task()}
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await reader.readexactly(50_000)
        writer.close()

    asyncio.run(scenario())


def test_threaded_stop_ends_the_thread(echo_server: Address) -> None:
    emulator = ThreadedLinkEmulator(echo_server, LinkConfig())
    emulator.start()
    thread = emulator._thread
    emulator.stop()
    assert thread is not None and not thread.is_alive()
    emulator.stop()  # twice is harmless


# --- gRPC and the CLI -----------------------------------------------------------------------


@contextmanager
def grpc_echo_server() -> Iterator[Address]:
    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request[::-1]

    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Reverse": grpc.unary_unary_rpc_method_handler(handle)}
    )
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield "127.0.0.1", port
    finally:
        server.stop(None)


def test_grpc_call_through_the_link() -> None:
    with grpc_echo_server() as target:
        emulator = ThreadedLinkEmulator(target, LinkConfig.parse("10mbit", "20ms"))
        with emulator as (host, port), grpc.insecure_channel(f"{host}:{port}") as channel:
            reverse = channel.unary_unary("/test.Echo/Reverse")
            payload = os.urandom(100_000)
            start = time.monotonic()
            assert reverse(payload, timeout=10) == payload[::-1]
            assert time.monotonic() - start >= 0.02
            states: list[grpc.ChannelConnectivity] = []
            record = states.append
            channel.subscribe(record)
            emulator.reset_all()  # a call racing the reset would fail UNAVAILABLE: callers retry
            wait_for(lambda: bool(states) and states[-1] != grpc.ChannelConnectivity.READY)
            channel.unsubscribe(record)
            assert reverse(b"abc", timeout=10, wait_for_ready=True) == b"cba"
            assert emulator.stats.connections == 2


def test_netem_prints_address_and_ctrl_c_exits_130(echo_server: Address) -> None:
    """Ctrl-C ends `edgecut netem` as it ends every verb: exit 130, one line, no traceback."""
    cmd = [sys.executable, "-m", "edgecut.cli", "netem", "--to", f"127.0.0.1:{echo_server[1]}"]
    cmd += ["--bandwidth", "8mbit", "--rtt", "10ms"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert line.startswith("listening 127.0.0.1:")
            with socket.create_connection(parse_address(line.split()[1])) as s:
                assert echo_round_trip(s, b"cli") == b"cli"
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=5) == 130
            err = proc.stderr.read()
            assert "interrupted" in err and "Traceback" not in err
        finally:
            proc.kill()


def test_run_netem_rejects_bad_arguments() -> None:
    with pytest.raises(UsageError):
        run_netem("127.0.0.1:0", "nowhere", None, None)
    with pytest.raises(UsageError):
        run_netem("127.0.0.1:0", "127.0.0.1:1", "8mbps", None)


def test_paced_burst_is_one_chunk_of_the_rate_and_at_least_one_mtu() -> None:
    from edgecut.netem import paced_burst_bytes

    assert paced_burst_bytes(8e6) == 4000  # 4 ms at 8 Mbit/s
    assert paced_burst_bytes(1e6) == 1500
    assert paced_burst_bytes(None) == LinkConfig().burst_bytes  # unlimited: nothing is paced


def test_netem_cli_refuses_an_empty_burst(capsys: pytest.CaptureFixture[str]) -> None:
    from edgecut.cli import main

    assert main(["netem", "--to", "127.0.0.1:9", "--bandwidth", "8mbit", "--burst", "0"]) == 2
    assert "error: --burst 0" in capsys.readouterr().err


def test_overhead_does_not_count_the_burst_credit_as_link_time() -> None:
    from edgecut.apps.sweep.report import framework_overhead

    ideal = 10.0 + 1.0 + 5.0 + 20.0  # edge, encode, tail compute, RTT; 8 KB within the burst
    assert framework_overhead(ideal, 10.0, 1.0, 5.0, 8000, 0, 8e6, 20.0, burst_bytes=16384) == 1.0
    # without the credit the same request would look faster than the link allows
    assert framework_overhead(ideal, 10.0, 1.0, 5.0, 8000, 0, 8e6, 20.0) < 1.0
