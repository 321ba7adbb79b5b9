"""Overload benchmark: is overload refused before it costs work?

    .venv/bin/python bench/overload.py                                   # this tree vs main's HEAD, same run
    .venv/bin/python bench/overload.py --baseline-ref b829b0d --overload-s 30 --rounds 1 --json out.json

Both servers, this tree ("new") and the baseline (`--baseline-ref`, checked out into a temporary
`git worktree add --detach`, run with PYTHONPATH pointing there), are real `python -m service`
processes with their default workers (2 on this machine) on free loopback ports, serving the same
freshly initialised `conv` from the same temporary store. They run one after the other (never
at the same time), in alternating order when `--rounds` > 1. Each is driven through these phases:

  healthy    `--healthy` concurrencies (8 and 16 clients) for `--healthy-s`: the peak goodput
  overload   `--clients` (512) clients for `--overload-s` (30 s): goodput, 503 latency, worker RSS
  recovery   the load is cut (every client connection closed) and one client sends the same request
             until it gets a 200: the seconds from the cut to that answer
  tenth      a tenth of the clients (51) for `--tenth-s`: how many were refused

Each phase starts after `--settle-s` (1 s) without load, from a server that has finished the last
phase's work. With 0 the overload's first herd (512 connects and bodies in the same ~30 ms) lands
while the workers still run the requests the healthy phase's clients abandoned at its cut, and this
generator (real-time, below) then holds one of the two CPUs for those ~30 ms: the worker whose event
loop is queued on that CPU answers its half of the herd 40-60 ms late, while the other answers in
~10 ms (`--settle-s 0` shows it). Clients of a real service bring their own CPUs, so
that says more about this generator than about the server; `--settle-s 0` still measures it.

Every client is a keep-alive HTTP/1.1 connection posting one multipart body of `--images` (64) real
8x8 PNGs (CIFAR-10 test images) to `/upscale` and waiting for the answer before the next (closed loop).
`--transport v2` posts the same images as one binary UINT8 tensor to `/v2/models/conv/infer` (as tritonclient
and perf_analyzer send them); `--transport grpc` sends them as a gRPC ModelInfer (raw_input_contents) over
grpc.aio, the clients spread over one HTTP/2 connection per 16 clients, and a refusal is UNAVAILABLE with
`retry-after` trailing metadata. A 503 is
answered as a well-behaved client does: it waits Retry-After, then retries (`--on-503 immediate`
retries at once instead: a client that ignores the header). A connection the server closes (or
resets) is reopened. Goodput = 200 answers per second (each carries 64 images).

The generator is a raw HTTP/1.1 client on asyncio (uvloop when present) in this process; it shares
the 2 CPU cores with the server (and with whatever else runs on the machine), so the table reports
its CPU use and the load average. Its own pauses would count as server latency: this process imports
torch (through model_store), and a full garbage collection over those objects stalled every client for
~200 ms at once (the 503 p99's outliers, all sent in the same millisecond). So its start-up objects are
frozen out of the collector (`gc.freeze()`), and the table reports its longest collection under overload.
Nor may it wait for a core behind the server's threads: clients of a real service have CPUs of their
own, and here the scheduler left this process unscheduled for up to 300 ms while the servers' threads
ran (its event loop's late ticks, logged as `client_stalls`), and every answer in flight then was
measured that much slower. So while it drives load it runs in the real-time class (`--generator-priority rt`,
SCHED_RR, the default where the kernel allows it): it preempts the servers whenever it has work, and
takes ~0.1 CPU-s per second, which the table reports. `--generator-priority normal` measures without it.
On a machine with CPUs to spare, `--server-cpus 0,1 --generator-cpus 2,3` gives the servers two CPUs
of their own and the clients others, as a real deployment has them: the servers size their workers
and threads by the CPUs they may use (upgrader/cpus.py), not by the host's count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "bench"))

from bench_service import DEFAULT_DATA, free_port, load_images, publish_fresh

from model_store import ModelStore

MODEL = "conv"
STEADY_AFTER_S = 2.0  # the 503 latency is also reported without the first seconds of the overload (the herd of new clients)
BOUNDARY = "overloadbenchboundary"


# ---- servers --------------------------------------------------------------------------------------
class Server:
    """`python -m service` from `tree` (its own PYTHONPATH and cwd), in its own session, logs to a file."""

    def __init__(self, name: str, tree: Path, store: Path, log_path: Path, autogroup_nice: int | None,
                 cpus: set[int] | None = None) -> None:
        self.name, self.tree, self.store, self.log_path, self.autogroup_nice = name, tree, store, log_path, autogroup_nice
        self.cpus = cpus  # the CPUs the server (and the workers it starts) may run on; None: all
        self.port, self.grpc_port = free_port(), free_port()
        # The tree first; other PYTHONPATH entries (packages installed into a folder, as bench/gpu_train.sh does on a
        # leased machine) stay, but not this project's own root, which would shadow a baseline tree.
        extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and Path(entry).resolve() != PROJECT_ROOT]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), *extra]), "PYTHONUNBUFFERED": "1", "UPGRADER_STORE": str(store),
                    "UPGRADER_DEFAULT_MODEL": MODEL, "UPGRADER_LOG_LEVEL": "WARNING", "UPGRADER_POLL_INTERVAL_S": "60",
                    "UPGRADER_GRPC_PORT": str(self.grpc_port)}
        self.env.pop("UPGRADER_WORKERS", None)  # the default for this machine, in both

    def __enter__(self) -> Server:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
                                     cwd=self.tree, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        if self.autogroup_nice is not None:  # its own session, so its own autogroup: the workers inherit it
            Path(f"/proc/{self.proc.pid}/autogroup").write_text(str(self.autogroup_nice))
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                    if response.status == 200 and len(self.workers()) >= 1:
                        time.sleep(2.0)  # every worker listening (each loads its models first)
                        return self
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} server not ready; see {self.log_path}")

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        with contextlib.suppress(OSError):
            pids = [int(p) for p in children.read_text().split()]
            # multiprocessing's spawn start adds a resource tracker: not a worker
            return [p for p in pids if "resource_tracker" not in _cmdline(p)] or [self.proc.pid]
        return [self.proc.pid]

    def rss_mb(self) -> dict[int, float]:
        return {pid: _rss_mb(pid) for pid in [self.proc.pid, *self.workers()]}

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def _rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- the load -------------------------------------------------------------------------------------
def multipart_request(port: int, pngs: list[bytes]) -> bytes:
    parts = b"".join(
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\nContent-Type: image/png\r\n\r\n".encode()
        + png + b"\r\n" for i, png in enumerate(pngs))
    body = parts + f"--{BOUNDARY}--\r\n".encode()
    head = (f"POST /upscale?model={MODEL} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nAccept: application/json\r\n\r\n").encode()
    return head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> tuple[int, dict[str, str]]:
    writer.write(payload)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers


@dataclass
class Phase:
    server: str
    phase: str
    clients: int
    seconds: float
    ok: int = 0
    refused: int = 0
    other: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # connection reset/closed mid-request, timeouts
    ok_ms: list[float] = field(default_factory=list)
    refused_ms: list[float] = field(default_factory=list)
    refused_at_s: list[float] = field(default_factory=list)  # when each refused request was sent, from the phase's start
    rss_mb: dict[str, float] = field(default_factory=dict)  # max sampled RSS per process
    client_cpu_s: float = 0.0
    client_gc_max_ms: float = 0.0  # the generator's longest garbage collection in the phase (its own pause, not the server's)
    client_stalls: list[tuple[float, float]] = field(default_factory=list)  # (at s, ms): the generator's event loop late by > 20 ms
    recovery_s: float | None = None

    def record(self, status: int, label: str, began: float, done: float, start: float, stop: float) -> None:
        """One answer: counted, with its latency, if it came before the phase's end; `label` names an other status."""
        if done > stop:
            return
        ms = (done - began) * 1000
        if status == 200:
            self.ok += 1
            self.ok_ms.append(ms)
        elif status == 503:
            self.refused += 1
            self.refused_ms.append(ms)
            self.refused_at_s.append(began - start)
        else:
            self.other[label] = self.other.get(label, 0) + 1

    @property
    def goodput(self) -> float:
        return self.ok / self.seconds

    def pct(self, values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    def refused_ms_after(self, seconds: float) -> list[float]:
        """503 latencies of the requests sent `seconds` or more into the phase."""
        return [ms for ms, at in zip(self.refused_ms, self.refused_at_s, strict=True) if at >= seconds]


async def drive(port: int, payload: bytes, clients: int, seconds: float, phase: Phase, on_503: str, server: Server,
                connect_first: bool = False) -> None:
    opened: list = [None] * clients
    if connect_first:  # every client connected before the clock starts (see --connect-first)
        opened = await asyncio.gather(*(asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10) for _ in range(clients)),
                                      return_exceptions=True)
    start = time.perf_counter()
    stop = start + seconds
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async def client(connection) -> None:
        reader, writer = connection if isinstance(connection, tuple) else (None, None)
        try:
            while time.perf_counter() < stop:
                try:
                    if writer is None:
                        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
                    began = time.perf_counter()
                    status, headers = await asyncio.wait_for(exchange(reader, writer, payload), 60)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                    if time.perf_counter() < stop:
                        phase.errors += 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    await asyncio.sleep(0.05)
                    continue
                phase.record(status, str(status), began, time.perf_counter(), start, stop)
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader = writer = None
                if status == 503 and on_503 == "retry-after":
                    await asyncio.sleep(float(headers.get("retry-after", "1")))
        finally:  # the phase's end, or the cut (cancel): the connection closes now, not when the task is collected
            if writer is not None:
                writer.close()

    async def watch_loop() -> None:
        """The generator's own stalls: a 1 ms tick that comes late means every client's answer was read late too."""
        while time.perf_counter() < stop:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            late = (time.perf_counter() - before - 0.001) * 1000
            if late > 20:
                phase.client_stalls.append((before - start, late))

    async def sample_rss() -> None:
        while time.perf_counter() < stop:
            for pid, mb in server.rss_mb().items():
                key = "supervisor" if pid == server.proc.pid and len(server.workers()) > 1 else f"worker {pid}"
                phase.rss_mb[key] = max(phase.rss_mb.get(key, 0.0), mb)
            await asyncio.sleep(0.5)

    collecting = [0.0]

    def gc_pause(event: str, info: dict) -> None:
        if event == "start":
            collecting[0] = time.perf_counter()
        else:
            phase.client_gc_max_ms = max(phase.client_gc_max_ms, (time.perf_counter() - collecting[0]) * 1000)

    gc.callbacks.append(gc_pause)
    tasks = [asyncio.create_task(client(connection)) for connection in opened]
    sampler, watcher = asyncio.create_task(sample_rss()), asyncio.create_task(watch_loop())
    await asyncio.sleep(max(0.0, stop - time.perf_counter()))
    for task in tasks:  # the cut: every connection closes, in-flight requests are abandoned
        task.cancel()
    await asyncio.gather(*tasks, sampler, watcher, return_exceptions=True)
    gc.callbacks.remove(gc_pause)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    phase.client_cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)


def v2_request(port: int, pngs: list[bytes]) -> bytes:
    """The PNGs' pixels as one binary UINT8 tensor, the way tritonclient posts it."""
    from PIL import Image

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1) for png in pngs])
    header = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    body = header + pixels.tobytes()
    head = (f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
            f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def grpc_request(pngs: list[bytes]) -> bytes:
    """A serialized ModelInferRequest carrying the PNGs' pixels in raw_input_contents."""
    from PIL import Image

    from service.grpc import messages

    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1) for png in pngs])
    request = messages.METHODS["ModelInfer"][0](model_name=MODEL)
    request.inputs.add(name="input", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


GRPC_CLIENTS_PER_CONNECTION = 16


def grpc_channels(port: int, clients: int) -> list:
    import grpc

    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]  # a connection of its own each
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            for _ in range(max(1, -(-clients // GRPC_CLIENTS_PER_CONNECTION)))]


async def grpc_exchange(channel, payload: bytes, timeout: float) -> tuple[int, dict[str, str]]:
    """One ModelInfer -> (HTTP-like status, {'retry-after': ...}): 200, 503 for UNAVAILABLE, else 500 + the code."""
    import grpc

    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None)
    try:
        await call(payload, timeout=timeout)
        return 200, {}
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            trailing = {k: v for k, v in (exc.trailing_metadata() or ())}
            return 503, {"retry-after": trailing.get("retry-after", "1")}
        if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise TimeoutError(exc.code().name) from None
        return 500, {"code": exc.code().name}


async def drive_grpc(port: int, payload: bytes, clients: int, seconds: float, phase: Phase, on_503: str, server: Server) -> None:
    """`drive`'s closed loop over gRPC: the same phases, counts and latencies."""
    channels = grpc_channels(port, clients)
    start = time.perf_counter()
    stop = start + seconds
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    async def client(index: int) -> None:
        channel = channels[index % len(channels)]
        while time.perf_counter() < stop:
            began = time.perf_counter()
            try:
                status, headers = await grpc_exchange(channel, payload, 60)
            except (OSError, TimeoutError):
                if time.perf_counter() < stop:
                    phase.errors += 1
                await asyncio.sleep(0.05)
                continue
            phase.record(status, headers.get("code", str(status)), began, time.perf_counter(), start, stop)
            if status == 503 and on_503 == "retry-after":
                await asyncio.sleep(float(headers.get("retry-after", "1")))

    try:
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients)), return_exceptions=True), seconds + 90)
    finally:
        for channel in channels:
            await channel.close()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        phase.client_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        phase.rss_mb = {str(pid): mb for pid, mb in server.rss_mb().items()}


async def recovery_grpc(port: int, payload: bytes, limit_s: float = 30.0) -> float | None:
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        channel = grpc_channels(port, 1)[0]
        try:
            if (await grpc_exchange(channel, payload, 10))[0] == 200:
                return time.perf_counter() - start
        except (OSError, TimeoutError):
            pass
        finally:
            await channel.close()
        await asyncio.sleep(0.02)
    return None


async def recovery(port: int, payload: bytes, limit_s: float = 30.0) -> float | None:
    """Seconds from now until one client gets a 200 for the same request."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            try:
                status, _ = await asyncio.wait_for(exchange(reader, writer, payload), 10)
            finally:
                writer.close()
            if status == 200:
                return time.perf_counter() - start
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        await asyncio.sleep(0.02)
    return None


@contextlib.contextmanager
def generator_priority(kind: str):
    """This process (the load generator) in the real-time class for the block when `kind` is "rt"; the servers keep theirs."""
    if kind != "rt":
        yield
        return
    os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


async def measure(server: Server, payload: bytes, args) -> list[Phase]:
    if args.transport == "grpc":  # the same phases against the server's gRPC port
        port = server.grpc_port

        async def drive(_, payload, clients, seconds, phase, on_503, server, connect_first=False):  # noqa: ARG001
            await drive_grpc(port, payload, clients, seconds, phase, on_503, server)

        async def recovery(_, payload):
            return await recovery_grpc(port, payload)
    else:
        drive, recovery = globals()["drive"], globals()["recovery"]
    phases = []
    await drive(server.port, payload, 4, 3.0, Phase(server.name, "warmup", 4, 3.0), args.on_503, server)
    for clients in args.healthy:
        phase = Phase(server.name, "healthy", clients, args.healthy_s)
        await asyncio.sleep(args.settle_s)
        await drive(server.port, payload, clients, args.healthy_s, phase, args.on_503, server)
        phases.append(phase)
        print(f"  {server.name:8} healthy c={clients:<4} {phase.goodput:7.1f} req/s", flush=True)
    phase = Phase(server.name, "overload", args.clients, args.overload_s)
    await asyncio.sleep(args.settle_s)
    await drive(server.port, payload, args.clients, args.overload_s, phase, args.on_503, server, args.connect_first)
    phase.recovery_s = await recovery(server.port, payload)
    phases.append(phase)
    print(f"  {server.name:8} overload c={args.clients:<4} {phase.goodput:7.1f} req/s, {phase.refused} refused, "
          f"recovery {phase.recovery_s}", flush=True)
    await asyncio.sleep(max(2.0, args.settle_s))
    tenth = max(1, args.clients // 10)
    phase = Phase(server.name, "tenth", tenth, args.tenth_s)
    await drive(server.port, payload, tenth, args.tenth_s, phase, args.on_503, server)
    phases.append(phase)
    print(f"  {server.name:8} tenth    c={tenth:<4} {phase.goodput:7.1f} req/s, {phase.refused} refused", flush=True)
    # The peak again, after the storm: on a shared machine the load changes within a run.
    clients = max(args.healthy)
    phase = Phase(server.name, "healthy-after", clients, args.healthy_s)
    await asyncio.sleep(args.settle_s)
    await drive(server.port, payload, clients, args.healthy_s, phase, args.on_503, server)
    phases.append(phase)
    print(f"  {server.name:8} healthy c={clients:<4} {phase.goodput:7.1f} req/s (after)", flush=True)
    return phases


# ---- report ---------------------------------------------------------------------------------------
def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def report(results: dict[str, list[Phase]], args, load: tuple[float, float, float]) -> str:
    rows = ["| measure | target | " + " | ".join(results) + " |", "|---|---|" + "---|" * len(results)]
    # The peak: the best healthy concurrency before the overload, averaged with the same after it.
    per = {name: {"peak": (max(p.goodput for p in ph if p.phase == "healthy") + max(p.goodput for p in ph if p.phase == "healthy-after")) / 2,
                  "before": max(p.goodput for p in ph if p.phase == "healthy"),
                  "after": max(p.goodput for p in ph if p.phase == "healthy-after"),
                  "over": [p for p in ph if p.phase == "overload"], "tenth": [p for p in ph if p.phase == "tenth"]}
           for name, ph in results.items()}

    def row(label: str, target: str, cell) -> None:
        rows.append(f"| {label} | {target} | " + " | ".join(cell(name, per[name]) for name in results) + " |")

    def med(values):
        values = [v for v in values if v is not None]
        return float(np.median(values)) if values else None

    row(f"peak goodput at {'/'.join(map(str, args.healthy))} clients, before / after the overload (req/s)", "",
        lambda n, r: f"{r['before']:.1f} / {r['after']:.1f}")
    row(f"goodput at {args.clients} clients (req/s)", "", lambda n, r: f"{med([p.goodput for p in r['over']]):.1f}")
    row("goodput under overload / peak", ">= 70%", lambda n, r: f"{100 * med([p.goodput for p in r['over']]) / r['peak']:.0f}%")
    row("503 answers under overload", "", lambda n, r: str(sum(p.refused for p in r["over"])))
    row("503 latency p50 (ms)", "", lambda n, r: fmt(med([p.pct(p.refused_ms, 50) for p in r["over"]]), ".1f"))
    row("503 latency p99 (ms)", "<= 50", lambda n, r: fmt(med([p.pct(p.refused_ms, 99) for p in r["over"]]), ".1f"))
    # All clients connect and send in the same millisecond at the start, and the refused ones retry
    # together one Retry-After later: the first seconds measure that herd, the rest the steady state.
    row(f"503 latency p99 from {STEADY_AFTER_S:g} s in (ms)", "", lambda n, r: fmt(med([p.pct(p.refused_ms_after(STEADY_AFTER_S), 99) for p in r["over"]]), ".1f"))
    row("200 latency p50 / p99 under overload (ms)", "", lambda n, r: f"{fmt(med([p.pct(p.ok_ms, 50) for p in r['over']]))} / "
        f"{fmt(med([p.pct(p.ok_ms, 99) for p in r['over']]))}")
    row("other statuses / connection errors under overload", "0 5xx but 503",
        lambda n, r: f"{json.dumps({k: v for p in r['over'] for k, v in p.other.items()}) if any(p.other for p in r['over']) else '{}'} / "
        f"{sum(p.errors for p in r['over'])}")
    row("max worker RSS under overload (MB)", "bounded",
        lambda n, r: ", ".join(f"{v:.0f}" for k, v in sorted(r["over"][0].rss_mb.items()) if k.startswith("worker")))
    row("supervisor RSS (MB)", "no torch", lambda n, r: fmt(r["over"][0].rss_mb.get("supervisor")))
    row("recovery: load cut -> first 200 (s)", "<= 1", lambda n, r: fmt(med([p.recovery_s for p in r["over"]]), ".2f"))
    row(f"refused at a tenth of the load ({max(1, args.clients // 10)} clients)", "0",
        lambda n, r: f"{sum(p.refused for p in r['tenth'])} of {sum(p.refused + p.ok for p in r['tenth'])}")
    row("generator CPU under overload (s per s)", "", lambda n, r: f"{med([p.client_cpu_s / p.seconds for p in r['over']]):.2f}")
    row("generator's longest GC pause / event-loop stall under overload (ms)", "",
        lambda n, r: f"{max(p.client_gc_max_ms for p in r['over']):.1f} / {max([ms for p in r['over'] for _, ms in p.client_stalls], default=0):.1f}")
    cpus = "" if not (args.server_cpus or args.generator_cpus) else (
        f"servers on CPUs {sorted(args.server_cpus) if args.server_cpus else 'all'}, generator on {sorted(args.generator_cpus) if args.generator_cpus else 'all'}; ")
    header = (f"{cpus}generator priority {args.generator_priority}; {'autogroup nice ' + str(args.autogroup_nice) + '; ' if args.autogroup_nice is not None else ''}{args.clients} clients{' (connected first)' if args.connect_first else ''} x {args.images}-image {dict(upscale='multipart bodies to /upscale', v2='binary tensors to /v2 infer', grpc='gRPC ModelInfer calls')[args.transport]} for {args.overload_s:g} s after {args.settle_s:g} s idle, 503s answered by "
              f"{'waiting Retry-After' if args.on_503 == 'retry-after' else 'retrying at once'}; {os.cpu_count()} CPUs, "
              f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (before) -> {' '.join(f'{x:.2f}' for x in os.getloadavg())} (after)")
    return header + "\n\n" + "\n".join(rows)


def cpu_list(text: str) -> set[int]:
    """"0,1" or "0-3" -> a set of CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-ref", default="main", help="git ref of the baseline server (default: main)")
    p.add_argument("--no-baseline", action="store_true", help="measure this tree only")
    p.add_argument("--clients", type=int, default=512)
    p.add_argument("--images", type=int, default=64, help="images per request")
    p.add_argument("--transport", choices=["upscale", "v2", "grpc"], default="upscale",
                   help="POST /upscale (multipart PNGs), POST /v2/models/conv/infer (a binary UINT8 tensor) or gRPC ModelInfer")
    p.add_argument("--overload-s", type=float, default=30.0)
    p.add_argument("--healthy", type=int, nargs="+", default=[8, 16], help="healthy concurrencies (the peak is the best of them)")
    p.add_argument("--healthy-s", type=float, default=8.0)
    p.add_argument("--tenth-s", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1, help="rounds; the servers alternate which goes first")
    p.add_argument("--settle-s", type=float, default=1.0,
                   help="idle seconds before each phase, so it starts from a server that has finished the last one's work (0: at once)")
    p.add_argument("--on-503", choices=["retry-after", "immediate"], default="retry-after")
    p.add_argument("--autogroup-nice", type=int, help="nice value of each server's (and this generator's) autogroup, e.g. -10: "
                   "approximates a dedicated machine when other tenants load it (as bench/bench_service.py)")
    p.add_argument("--generator-priority", choices=["rt", "normal"], default="rt",
                   help="rt: this generator in the real-time class while it drives load (see above); normal: as the servers")
    p.add_argument("--connect-first", action="store_true",
                   help="open the overload's connections before its clock starts, as wrk and perf_analyzer do (default: each "
                        "client connects as it starts, so the first second also measures 512 connections accepted at once)")
    p.add_argument("--server-cpus", type=cpu_list, help="CPUs the servers run on, e.g. 0,1 (default: all)")
    p.add_argument("--generator-cpus", type=cpu_list,
                   help="CPUs this generator runs on, e.g. 2,3: on a machine with CPUs to spare, clients that bring their own "
                        "(default: all, shared with the servers)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--json", type=Path, help="write every phase's numbers here")
    args = p.parse_args()
    if args.generator_cpus:
        os.sched_setaffinity(0, args.generator_cpus)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    load = os.getloadavg()
    if args.autogroup_nice is not None:
        Path("/proc/self/autogroup").write_text(str(args.autogroup_nice))
    with tempfile.TemporaryDirectory(prefix="upgrader-overload-") as tmp:
        tmp = Path(tmp)
        targets, pngs = load_images(args.data, args.images)
        publish_fresh(ModelStore(tmp / "store"), MODEL, 0, targets, pngs)
        gc.collect()
        gc.freeze()  # torch and the rest of start-up out of the collector's reach (see the module's docstring)
        trees = {"new": PROJECT_ROOT}
        if not args.no_baseline:
            base = tmp / "baseline"
            subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "add", "--detach", str(base), args.baseline_ref], check=True,
                           capture_output=True)
            rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
            trees[f"baseline {rev}"] = base
        results: dict[str, list[Phase]] = {name: [] for name in trees}
        try:
            for round_ in range(args.rounds):
                order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
                for name in order:
                    print(f"round {round_ + 1}: {name}", flush=True)
                    with Server(name, trees[name], tmp / "store", tmp / f"{name.split()[0]}-{round_}.log", args.autogroup_nice,
                                args.server_cpus) as server:
                        with generator_priority(args.generator_priority):
                            request = {"upscale": multipart_request, "v2": v2_request,
                                       "grpc": lambda _, images: grpc_request(images)}[args.transport](server.port, pngs[: args.images])
                            results[name] += asyncio.run(measure(server, request, args))
        finally:
            if not args.no_baseline:
                subprocess.run(["git", "-C", str(PROJECT_ROOT), "worktree", "remove", "--force", str(tmp / "baseline")], check=False)
    table = report(results, args, load)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"table": table, "phases": {name: [asdict(p) | {"goodput": p.goodput} for p in ph]
                                                                   for name, ph in results.items()}}, indent=1))


if __name__ == "__main__":
    main()
