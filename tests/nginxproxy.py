"""The shipped nginx proxy (deploy/nginx/upgrader.conf.template) run for real in front of a test's server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "upgrader.conf.template"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(upstream: str, port: int, **settings) -> str:
    """The template as envsubst renders it in the nginx image (only the variables it names; nginx's own `$vars` stay)."""
    values = {"UPGRADER_PROXY_UPSTREAM": upstream, "UPGRADER_PROXY_PORT": str(port), "UPGRADER_HEADER_TIMEOUT_S": "10",
              "UPGRADER_BODY_TIMEOUT_S": "20", "UPGRADER_MAX_CONNECTIONS": "1000", "UPGRADER_MAX_BODY_BYTES": str(32 << 20),
              **{f"UPGRADER_{key.upper()}": str(value) for key, value in settings.items()}}
    return string.Template(TEMPLATE.read_text()).safe_substitute(values)


class NginxProxy:
    """nginx (the Debian package) with the rendered template as its only server, on a free loopback port."""

    def __init__(self, upstream_url: str, **settings) -> None:
        if NGINX is None:
            pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="upgrader-nginx-"))
        server = render(upstream_url.removeprefix("http://"), self.port, **settings)
        (self.dir / "nginx.conf").write_text(
            f"worker_processes 1;\npid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log warn;\ndaemon off;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n client_body_temp_path {self.dir}/body;\n proxy_temp_path {self.dir}/proxy;\n"
            f" fastcgi_temp_path {self.dir}/fcgi;\n uwsgi_temp_path {self.dir}/uwsgi;\n scgi_temp_path {self.dir}/scgi;\n"
            f"{server.replace('/dev/stdout', str(self.dir / 'access.log')).replace('/dev/stderr', str(self.dir / 'error.log'))}\n}}\n")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> NginxProxy:
        check = subprocess.run([NGINX, "-t", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen([NGINX, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                assert self.process.poll() is None, self.process.stderr.read().decode()
                assert time.monotonic() < deadline, "nginx did not listen"
                time.sleep(0.05)

    def access_log(self) -> list[str]:
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
