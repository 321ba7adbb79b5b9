"""service.workers: one owner per port. A second instance on a port that is taken fails at start, naming the port."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest
from test_service_support import ServiceProcess, publish

from model_store import ModelStore
from service.workers import PortTaken, claim_ports, listening_socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def second_instance(store: ModelStore, port: int, grpc_port: int, *flags: str) -> subprocess.CompletedProcess:
    """`python -m service` on ports another instance holds: it must exit by itself (a timeout fails the test)."""
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--store", store.url, *flags]
    env = {"UPGRADER_GRPC_PORT": str(grpc_port), "UPGRADER_DEFAULT_MODEL": "fc", "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_second_instance_on_a_taken_port_fails_naming_it_and_the_first_keeps_every_request(tmp_path, workers):
    first_store, second_store = ModelStore(tmp_path / "first"), ModelStore(tmp_path / "second")
    publish(first_store, "conv", seed=1)
    publish(second_store, "fc", seed=2)
    port, grpc_port = free_port(), free_port()
    first = ServiceProcess(first_store.url, "--workers", workers, port=port, env={"UPGRADER_GRPC_PORT": str(grpc_port)})
    try:
        first.wait_ready()
        # The same HTTP and gRPC ports: refused on the HTTP port, the first named.
        taken = second_instance(second_store, port, grpc_port, "--workers", "2")
        assert taken.returncode != 0
        assert f"HTTP port {port} on 127.0.0.1 is already in use" in taken.stderr, taken.stderr
        # A free HTTP port but the gRPC port in use: refused on the gRPC port. One worker or several, the same.
        for flags in (("--workers", "1"), ("--workers", "2")):
            taken = second_instance(second_store, free_port(), grpc_port, *flags)
            assert taken.returncode != 0
            assert f"gRPC port {grpc_port} on 127.0.0.1 is already in use" in taken.stderr, taken.stderr
        # Every answer still comes from the first instance (its store has conv, the second's fc).
        for _ in range(16):
            with httpx.Client(timeout=10) as fresh:  # a new connection each time: each is hashed to a listening socket anew
                assert [m["name"] for m in fresh.get(f"{first.url}/models").json()["models"]] == ["conv"]
    finally:
        first.stop()
    # Once the first has stopped, its ports are free again.
    for sock in claim_ports("127.0.0.1", {"HTTP": port, "gRPC": grpc_port}):
        sock.close()


def test_claimed_ports_are_refused_to_a_plain_bind_and_joined_by_reuseport_sockets():
    port = free_port()
    claimed = claim_ports("127.0.0.1", {"HTTP": port})
    try:
        with pytest.raises(PortTaken, match=f"HTTP port {port} on 127.0.0.1 is already in use"):
            claim_ports("127.0.0.1", {"HTTP": port})
        with socket.socket() as plain, pytest.raises(OSError):  # what uvicorn, gunicorn or Triton would do
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            plain.bind(("127.0.0.1", port))
        worker = listening_socket("127.0.0.1", port)  # this instance's own workers join the port
        worker.listen()
        with socket.create_connection(("127.0.0.1", port), timeout=5):  # and connections reach them
            pass
        worker.close()
    finally:
        for sock in claimed:
            sock.close()
    assert claim_ports("127.0.0.1", {"HTTP": 0, "gRPC": None}) == []  # port 0: the kernel picks one, nothing to claim
