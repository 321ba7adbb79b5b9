"""The `upgrader` command: `upgrader upscale PATH... -o OUTDIR` upscales files, folders and globs through the service.

Each input goes to `POST /upscale` (upgrader.client.AsyncClient: one raw image per request, `--jobs` in flight,
retries per upgrader.client.RetryPolicy) and its answer is written, byte for byte as the service wrote it, to the
input's place under OUTDIR with the format's extension: written to a temporary name in the same folder, then
renamed, so an output that exists is complete. An output already there is skipped (resume) unless `--overwrite`.
`--local` runs the service's own app in this process (service.app.create_app inside its lifespan, called over
httpx.ASGITransport): the same decoding, model and encoding as a server, without one.

On a terminal a progress bar (rich: files, output megapixels/s, ETA, failures) and a summary table; otherwise one
JSON line per file and a last summary line. Exit status: 0 every file done or skipped, 1 any file failed (or the
service could not be reached), 2 bad usage.

This command lives in `service/` for `--local`; without it nothing of the service (nor torch) is imported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from upgrader.client import (
    EXTENSIONS,
    FORMAT_ALIASES,
    FORMATS,
    AsyncClient,
    RequestError,
    RetryPolicy,
    UpgraderError,
    default_url,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED = PROJECT_ROOT / "pretrained"  # the shipped models: `--local` serves a copy of them unless --store names a store
DEFAULT_MODEL = "photo"
# Requests in flight. bench/bench_folder.py times --jobs 1, 2, 4 and 8 on a folder of photos against a server: on
# 2 cores with the default 2 workers, 2 and 4 were equally fast (22.8 and 22.5 files/s), 1 and 8 slower.
DEFAULT_JOBS = 2
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"})
PART_SUFFIX = ".part"  # a file being written; renamed to its name once complete


class UsageError(Exception):
    """Bad usage found after parsing (a missing input, an OUTDIR that cannot be written): exit 2."""


# ---- arguments --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upgrader", description="Upgrader from the command line (docs/client.md).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = commands.add_parser("upscale", help="upscale files, folders and globs into OUTDIR",
                             description="Upscale images 4x through an Upgrader service (or in this process with --local) into OUTDIR, "
                                         "keeping the inputs' folder structure. Outputs already there are skipped unless --overwrite. "
                                         "Exit status: 0 all done, 1 any file failed, 2 bad usage.")
    up.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders (their images; all levels with --recursive) and globs "
                    "('photos/*.jpg', quoted; '**' with --recursive)")
    up.add_argument("-o", "--output", required=True, metavar="OUTDIR", type=Path, help="where the outputs go (created if missing)")
    up.add_argument("--model", default=DEFAULT_MODEL, help=f"the model to upscale with (default: {DEFAULT_MODEL}, the photo model)")
    up.add_argument("--format", default="png", choices=[*FORMATS, *FORMAT_ALIASES], help="output format (default png)")
    up.add_argument("--quality", type=int, metavar="1-100", help="quality of webp (lossy when given), jpeg and avif")
    up.add_argument("--jobs", "-j", type=_positive, default=DEFAULT_JOBS, metavar="N", help=f"requests in flight (default {DEFAULT_JOBS})")
    up.add_argument("--recursive", "-r", action="store_true", help="folders: every level below; globs: '**' matches folders")
    up.add_argument("--overwrite", action="store_true", help="upscale again files whose output exists (default: skip them)")
    up.add_argument("--url", default=None, help="the service (default: UPGRADER_URL, else http://127.0.0.1:8000)")
    up.add_argument("--api-key", default=None, help="sent as Authorization: Bearer (default: UPGRADER_API_KEY)")
    up.add_argument("--local", action="store_true", help="no server: run the service's app in this process, on a copy of the shipped "
                    "models (pretrained/) or on --store")
    up.add_argument("--store", default=None, help="with --local: the model store to serve (a directory or s3://bucket/prefix)")
    up.add_argument("--retries", type=_non_negative, default=RetryPolicy.attempts - 1, metavar="N",
                    help=f"tries again after a connection error, with exponential backoff (default {RetryPolicy.attempts - 1}); "
                         "503 answers are retried after their Retry-After")
    up.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS", help="per request try (default 120)")
    up.add_argument("--json", action="store_true", help="one JSON line per file even on a terminal (the default when stdout is not one)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


# ---- inputs and outputs -----------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    source: Path  # the input as named (or found)
    output: Path  # OUTDIR / its place / stem + the format's extension


def _is_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _glob_base(pattern: str) -> Path:
    """The folder a glob's matches are placed relative to: its leading components without wildcards."""
    parts = Path(pattern).parts
    base = [part for part in parts[: next((i for i, p in enumerate(parts) if _is_glob(p)), len(parts))]]
    return Path(*base) if base else Path(".")


def _images_in(folder: Path, recursive: bool) -> Iterable[Path]:
    entries = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def collect(paths: list[str], outdir: Path, extension: str, recursive: bool) -> list[Job]:
    """Every input with its output: a file goes to OUTDIR/<its name>, a folder's images (a glob's matches) to their place
    below the folder (below the glob's fixed part). Files inside OUTDIR are left out; two inputs with one output are
    refused."""
    found: list[tuple[Path, Path]] = []  # (source, place relative to OUTDIR)
    for text in paths:
        path = Path(text)
        if path.is_file():
            found.append((path, Path(path.name)))
        elif path.is_dir():
            found += [(p, p.relative_to(path)) for p in _images_in(path, recursive)]
        elif _is_glob(text):
            base = _glob_base(text)
            matches = sorted(Path(m) for m in glob.glob(text, recursive=recursive))
            if not matches:
                raise UsageError(f"{text}: the pattern matches no file")
            for match in matches:
                if match.is_file():
                    found.append((match, match.relative_to(base)))
                elif match.is_dir():
                    found += [(p, match.relative_to(base) / p.relative_to(match)) for p in _images_in(match, recursive)]
        else:
            raise UsageError(f"{text}: no such file or folder")
    outdir_resolved = outdir.resolve()
    jobs: dict[Path, Job] = {}
    for source, place in found:
        resolved = source.resolve()
        if resolved.is_relative_to(outdir_resolved):
            continue  # an output of an earlier run
        output = outdir / place.with_suffix(extension)
        if output in jobs:
            if jobs[output].source.resolve() == resolved:
                continue  # the same file named twice
            raise UsageError(f"{jobs[output].source} and {source} would both be written to {output}; upscale them into different OUTDIRs")
        jobs[output] = Job(source, output)
    return list(jobs.values())


def prepare_outdir(outdir: Path) -> None:
    """OUTDIR exists (created if missing) and a file can be created in it, or UsageError: checked before any request."""
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"OUTDIR {outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=outdir, prefix=".upgrader-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"OUTDIR {outdir} is not writable: {exc.strerror or exc}") from None


def write_atomically(path: Path, data: bytes) -> None:
    """`data` at `path`, whole or not at all: written to a hidden temporary file beside it, flushed, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the answer's header, without decoding its pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - a size is only reported; the bytes are written as they came
        return None


# ---- results and reports ----------------------------------------------------------------
@dataclass
class Outcome:
    job: Job
    status: str  # done, skipped or failed
    seconds: float = 0.0
    size: tuple[int, int] | None = None
    model: str | None = None
    version: int | None = None
    error: dict | None = None  # code, message, item, status

    @property
    def megapixels(self) -> float:
        return self.size[0] * self.size[1] / 1e6 if self.size else 0.0

    def record(self) -> dict:
        record = {"event": "file", "input": str(self.job.source), "output": str(self.job.output), "status": self.status}
        if self.status == "done":
            record.update(width=self.size[0] if self.size else None, height=self.size[1] if self.size else None,
                          megapixels=round(self.megapixels, 6), seconds=round(self.seconds, 4), model=self.model, version=self.version)
        if self.error is not None:
            record["error"] = self.error
        return record


@dataclass
class Summary:
    total: int
    started: float = field(default_factory=time.perf_counter)
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def megapixels(self) -> float:
        return sum(o.megapixels for o in self.outcomes if o.status == "done")

    @property
    def megapixels_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    def record(self) -> dict:
        return {"event": "summary", "files": self.total, "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.count("failed"), "seconds": round(self.seconds, 3), "output_megapixels": round(self.megapixels, 6),
                "megapixels_per_s": round(self.megapixels_per_s, 4),
                "failures": [{"input": str(o.job.source), **(o.error or {})} for o in self.failures()]}


class JsonReport:
    """One JSON object a line on stdout: one per file as it finishes, then the summary."""

    def __init__(self, summary: Summary, stream=None) -> None:
        self.summary, self.stream = summary, stream or sys.stdout

    def __enter__(self) -> JsonReport:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def add(self, outcome: Outcome) -> None:
        self.summary.outcomes.append(outcome)
        self.stream.write(json.dumps(outcome.record()) + "\n")
        self.stream.flush()

    def finish(self) -> None:
        self.stream.write(json.dumps(self.summary.record()) + "\n")
        self.stream.flush()


class ProgressReport:
    """rich's progress bar on the terminal (files, output MP/s, ETA, failures), then a summary table and the failures."""

    def __init__(self, summary: Summary) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.summary = summary
        self.console = Console()
        self.progress = Progress(TextColumn("upscaling"), BarColumn(), MofNCompleteColumn(), TextColumn("files"),
                                 TextColumn("{task.fields[mps]:.2f} MP/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("[red]{task.fields[failed]} failed"), console=self.console)
        self.task = self.progress.add_task("upscale", total=summary.total, mps=0.0, failed=0)

    def __enter__(self) -> ProgressReport:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def add(self, outcome: Outcome) -> None:
        self.summary.outcomes.append(outcome)
        self.progress.update(self.task, advance=1, mps=self.summary.megapixels_per_s, failed=self.summary.count("failed"))

    def finish(self) -> None:
        from rich.table import Table

        self.progress.stop()
        s = self.summary
        table = Table(title="upgrader upscale")
        for column in ("done", "skipped", "failed", "time", "output MP", "MP/s"):
            table.add_column(column, justify="right")
        table.add_row(str(s.count("done")), str(s.count("skipped")), str(s.count("failed")), f"{s.seconds:.1f} s",
                      f"{s.megapixels:.2f}", f"{s.megapixels_per_s:.2f}")
        self.console.print(table)
        failures = s.failures()
        if failures:
            errors = Table(title=f"{len(failures)} failed", title_style="red")
            for column in ("file", "status", "code", "message"):
                errors.add_column(column, overflow="fold")
            for o in failures:
                error = o.error or {}
                errors.add_row(str(o.job.source), str(error.get("status") or ""), error.get("code", ""), error.get("message", ""))
            self.console.print(errors)


# ---- the run ----------------------------------------------------------------------------
async def upscale_one(client: AsyncClient, job: Job, args: argparse.Namespace) -> Outcome:
    started = time.perf_counter()
    try:
        result = await client.upscale(job.source, model=args.model, format=args.format, quality=args.quality)
    except UpgraderError as exc:
        return Outcome(job, "failed", time.perf_counter() - started, error=exc.to_dict())
    except OSError as exc:
        return Outcome(job, "failed", time.perf_counter() - started,
                       error={"code": "read_failed", "message": f"{job.source}: {exc.strerror or exc}", "item": None, "status": None})
    try:
        await asyncio.to_thread(write_atomically, job.output, result.data)
    except OSError as exc:
        return Outcome(job, "failed", time.perf_counter() - started,
                       error={"code": "write_failed", "message": f"{job.output}: {exc.strerror or exc}", "item": None, "status": None})
    return Outcome(job, "done", time.perf_counter() - started, image_size(result.data), result.model, result.version)


async def upscale_all(client: AsyncClient, jobs: list[Job], args: argparse.Namespace, report) -> None:
    """Skips the jobs whose output exists (unless --overwrite), then runs the others `--jobs` at a time."""
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        if not args.overwrite and job.output.exists():
            report.add(Outcome(job, "skipped"))
        else:
            queue.put_nowait(job)

    async def worker() -> None:
        while not queue.empty():
            report.add(await upscale_one(client, queue.get_nowait(), args))

    await asyncio.gather(*(worker() for _ in range(min(args.jobs, max(1, queue.qsize())))))


async def check_model(client: AsyncClient, model: str) -> None:
    """The model exists on the service, or UsageError naming those that do (before any image is sent)."""
    models = await client.models()
    if models.get(model) is None:
        raise UsageError(f"--model {model}: the service at {client.base_url} has no such model; it has {', '.join(models.names()) or 'none'}")


@contextlib.asynccontextmanager
async def local_client(store: str | None, retry: RetryPolicy, timeout: float) -> AsyncIterator[AsyncClient]:
    """An AsyncClient whose requests go to the service's app in this process (its lifespan run: models loaded, batchers
    started), over httpx.ASGITransport; on a temporary copy of pretrained/ unless `store` is given."""
    import httpx

    from service.app import create_app
    from service.settings import Settings

    with contextlib.ExitStack() as stack:
        if store is None:
            if not PRETRAINED.is_dir():
                raise UsageError(f"--local: no shipped models at {PRETRAINED}; name a model store with --store")
            copy = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="upgrader-local-"))) / "store"
            shutil.copytree(PRETRAINED, copy)
            store = str(copy)
        app = create_app(Settings(store=store, grpc_port=0, api_keys=()))  # no gRPC port, no keys: nothing outside this process reaches it
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with AsyncClient("http://upgrader.local", transport=transport, retry=retry, timeout=timeout) as client:
                yield client


async def run(args: argparse.Namespace, jobs: list[Job], report) -> None:
    retry = RetryPolicy(attempts=args.retries + 1)
    if args.local:
        opened = local_client(args.store, retry, args.timeout)
    else:
        opened = AsyncClient(args.url or default_url(), api_key=args.api_key,  # None: UPGRADER_API_KEY
                             retry=retry, timeout=args.timeout, max_connections=args.jobs)
    async with opened as client:
        await check_model(client, args.model)
        report.summary.started = time.perf_counter()  # the run's time and MP/s leave out starting (--local: loading the models)
        with report:
            await upscale_all(client, jobs, args, report)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.format = FORMAT_ALIASES.get(args.format, args.format)
    if args.quality is not None and not 1 <= args.quality <= 100:
        parser.error(f"--quality must be 1-100, got {args.quality}")
    if args.store is not None and not args.local:
        parser.error("--store names the store of --local; a server serves its own")
    try:
        jobs = collect(args.paths, args.output, EXTENSIONS[args.format], args.recursive)
        prepare_outdir(args.output)
    except UsageError as exc:
        parser.error(str(exc))
    summary = Summary(total=len(jobs))
    report = JsonReport(summary) if args.json or not sys.stdout.isatty() else ProgressReport(summary)
    try:
        asyncio.run(run(args, jobs, report))
    except UsageError as exc:
        parser.error(str(exc))
    except RequestError as exc:  # the service refused the check before any image: a wrong key, a bad URL path
        print(f"upgrader: error: {exc}", file=sys.stderr)
        return 2
    except UpgraderError as exc:  # no service answering at all
        print(f"upgrader: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("upgrader: interrupted; outputs written so far are complete, and a new run resumes after them", file=sys.stderr)
        return 130
    report.finish()
    return 1 if summary.count("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
