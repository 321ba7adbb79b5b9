"""The model manager: which versions are loaded, which one answers `latest`, and hot reload.

State per model, refreshed from the store every `poll_interval_s` (and at once when a
request names a model or version the last scan has not seen):

* `serving`: the newest version that loaded; `version=latest` resolves to it. A newer
  version is loaded in the background and swapped in by one assignment, so a request
  either got the old `Served` or the new one; a request holds a lease on its `Served`
  until it has answered, and a replaced version is only shut down when its last lease
  is returned (its queue drained).
* `failed`: versions whose verification or loading failed, with the reason; they are
  reported (log, metric, GET /models) and never served, and `serving` stays where it was.
* aliased versions are kept loaded; other versions load on demand and the least
  recently used beyond `extra_loaded_versions` are unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from model_store import LATEST, ModelStore, StoreUnavailable, parse_version
from service.runtime.batching import Batcher
from service.errors import ApiError, echo, unavailable
from service.runtime.forward_choices import ForwardChoices
from service.observability.metrics import Metrics
from service.redact import scrub_text
from service.settings import Settings
from service.runtime.upscaler import Upscaler, pick_device, pick_precision

log = logging.getLogger("service.runtime.registry")


@dataclass(eq=False)
class Served:
    """A loaded version with its batcher, and the leases of requests using it."""

    name: str
    version: int
    manifest: dict
    batcher: Batcher
    any_size: bool = False  # the model takes any H x W: whole-image inference (service.runtime.wholeimage)
    halo: int = 0  # its receptive radius in input pixels (Upscaler.halo)
    last_used: float = field(default_factory=time.monotonic)
    leases: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.released.set()


@dataclass
class ModelState:
    name: str
    versions: list[int] = field(default_factory=list)
    aliases: dict[str, int] = field(default_factory=dict)  # explicit ones; `latest` means `serving`
    manifests: dict[int, dict] = field(default_factory=dict)  # versions are immutable: read once
    loaded: dict[int, Served] = field(default_factory=dict)
    loading: dict[int, asyncio.Task] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    serving: int | None = None

    def pinned(self) -> set[int]:
        return {self.serving, *self.aliases.values()} - {None}


@dataclass
class _Scan:
    versions: list[int]
    aliases: dict[str, int]
    manifests: dict[int, dict]
    unreadable: dict[int, str]


class ModelManager:
    def __init__(self, settings: Settings, metrics: Metrics, tracer=None):
        self.settings, self.metrics, self.tracer = settings, metrics, tracer  # tracer: the batch spans' (None: tracing off)
        self.store = ModelStore(settings.store, cache_dir=settings.model_cache)
        self.device = pick_device(settings.device)
        self.precision = pick_precision(settings.precision, self.device)
        self.forward_choices = ForwardChoices(settings.forward_choices_file())  # the CPU forward of each version, decided once per machine
        self.models: dict[str, ModelState] = {}
        self.default_model: str | None = settings.default_model
        self._watcher: asyncio.Task | None = None
        self._retiring: set[asyncio.Task] = set()
        self._closing = False
        self._store_down = False
        self._store_problem: str | None = None  # the last cause logged for not serving (once per cause, not per poll)

    # ---- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        torch.set_num_threads(self.settings.inference_threads())
        try:
            await self.refresh()
        except StoreUnavailable:  # logged by refresh; the watcher keeps trying, /readyz says not ready
            pass
        self._watcher = asyncio.create_task(self._watch(), name="store-watcher")
        log.info("model manager started", extra={"store": self.store.url, "device": str(self.device), "precision": self.precision,
                                                  "models": {n: s.serving for n, s in self.models.items()}, "default_model": self.default_model})

    async def close(self) -> None:
        """Stop watching, then let every loaded version finish its queue."""
        self._closing = True
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for state in self.models.values():
            for served in list(state.loaded.values()):
                self._retire(state, served)
        await asyncio.gather(*self._retiring)

    async def _watch(self) -> None:
        """Scan every poll interval; while the store cannot be read, back off (doubling) and keep serving."""
        delay = self.settings.poll_interval_s
        while True:
            await asyncio.sleep(delay)
            try:
                await self.refresh()
                delay = self.settings.poll_interval_s
            except StoreUnavailable:
                delay = min(delay * 2, max(self.settings.poll_max_backoff_s, self.settings.poll_interval_s))
            except Exception:  # a store hiccup must not end hot reload
                log.exception("store scan failed", extra={"store": self.store.url})

    # ---- store scanning -----------------------------------------------------------
    def _scan_model(self, name: str, known: set[int], versions: list[int], aliases: dict[str, int]) -> _Scan:
        """New manifests of one model's versions (runs in a thread)."""
        manifests, unreadable = {}, {}
        for version in set(versions) - known:
            try:
                manifests[version] = self.store.manifest(name, version)
            except StoreUnavailable:
                raise
            except Exception as exc:
                unreadable[version] = str(exc)
        return _Scan(versions, {k: v for k, v in aliases.items() if k != LATEST}, manifests, unreadable)

    def _scan(self, known: dict[str, set[int]]) -> tuple[dict[str, _Scan], set[str]]:
        """Every model's scan (one listing of the store), and the models that could not be read this time (kept as they were)."""
        listing, scans, unreadable = self.store.scan(), {}, set()
        for name, versions in listing.versions.items():
            try:
                aliases = self.store.stored_aliases(name, listing.aliases_tags.get(name))
                scans[name] = self._scan_model(name, known.get(name, set()), versions, aliases)
            except StoreUnavailable:
                raise
            except Exception as exc:  # e.g. a hand-edited aliases.json: that model waits, the others reload
                unreadable.add(name)
                log.warning("cannot read model from the store", extra={"model": name, "reason": f"{type(exc).__name__}: {exc}"})
        return scans, unreadable

    def _merge(self, name: str, scan: _Scan) -> ModelState:
        state = self.models.setdefault(name, ModelState(name))
        state.versions, state.aliases = scan.versions, scan.aliases
        state.manifests.update(scan.manifests)
        for version, reason in scan.unreadable.items():
            self._record_failure(state, version, reason)
        if state.serving is not None and state.serving not in state.versions:
            state.serving = None  # deleted from the store: pick the newest loadable one again
        return state

    async def refresh(self) -> None:
        """Scan the store, load what should be loaded, unload what should not."""
        known = {name: set(state.manifests) | set(state.failed) for name, state in self.models.items()}
        try:
            scans, unreadable = await asyncio.to_thread(self._scan, known)
        except StoreUnavailable as exc:
            self._store_down = True
            self.metrics.store_up.set(0)
            self.metrics.store_errors.inc()
            self._log_problem(f"model store unreachable: {exc}", "model store unreachable; serving the versions already loaded",
                              reason=str(exc))
            raise
        if self._store_down:
            log.info("model store reachable again", extra={"store": self.store.url})
        self._store_down = False
        self.metrics.store_up.set(1)
        if not scans and not unreadable:
            self._log_problem("empty", "the model store holds no models: nothing is served until a version is published")
        else:
            self._store_problem = None
        for name in set(self.models) - set(scans) - unreadable:
            for served in list(self.models[name].loaded.values()):
                self._retire(self.models[name], served)
            del self.models[name]
        for name, scan in scans.items():
            state = self._merge(name, scan)
            await self._advance_serving(state)
            for version in state.pinned():
                if version not in state.failed:
                    with contextlib.suppress(ApiError):  # recorded as failed; the alias answers 503
                        await self._ensure_loaded(state, version)
            self._evict(state)
            self._update_gauges(state)
        self.default_model = self.settings.default_model or self._best_model()

    def _log_problem(self, cause: str, message: str, **extra) -> None:
        """Why nothing new can be served, logged once until the cause changes or goes away (not on every poll)."""
        if cause != self._store_problem:
            self._store_problem = cause
            log.error(message, extra={"store": self.store.url, **extra})

    async def _rescan(self, name: str) -> ModelState | None:
        """Read one model again (a request named something the last scan has not seen)."""
        known = set(self.models[name].manifests) if name in self.models else set()

        def scan_one() -> _Scan | None:
            try:
                versions, aliases = self.store.index(name)
            except (ValueError, LookupError):  # not a valid model name, or not in the store
                return None
            return self._scan_model(name, known, versions, aliases)

        try:
            scan = await asyncio.to_thread(scan_one)
        except StoreUnavailable as exc:  # answer from what was last seen
            log.warning("model store unreachable on a request's rescan", extra={"model": name, "reason": str(exc)})
            return self.models.get(name)
        if scan is None or not scan.versions:
            return self.models.get(name)
        state = self._merge(name, scan)
        if state.serving is None:
            await self._advance_serving(state)
        return state

    def _best_model(self) -> str | None:
        """The model whose serving version gains most over bicubic on its own validation images.

        The gain, not the raw PSNR: versions are scored on different images (CIFAR-10's test split, a
        subset, other data) or protocols (exact floats before `evaluation`, 8-bit now), which move
        the PSNR of bicubic and model alike. A version without a bicubic figure ranks by its PSNR after those with one.
        """
        def rank(state: ModelState) -> tuple[int, float]:
            metrics = state.manifests.get(state.serving, {}).get("metrics", {})
            model, bicubic = (metrics.get(k, {}).get("psnr") for k in ("model", "bicubic"))
            if not isinstance(model, (int, float)):
                return (2, 0.0)
            if not isinstance(bicubic, (int, float)):
                return (1, -float(model))
            return (0, float(bicubic) - float(model))

        candidates = sorted((s for s in self.models.values() if s.serving is not None), key=lambda s: (rank(s), s.name))
        return candidates[0].name if candidates else None

    # ---- loading ------------------------------------------------------------------
    async def _advance_serving(self, state: ModelState) -> None:
        """Swap `serving` to the newest version newer than it that loads."""
        for version in sorted(state.versions, reverse=True):
            if state.serving is not None and version <= state.serving:
                return
            if version in state.failed:
                continue
            try:
                await self._ensure_loaded(state, version)
            except ApiError:
                continue
            if state.serving is None or version > state.serving:
                previous, state.serving = state.serving, version
                log.info("serving new version", extra={"model": state.name, "version": version, "previous": previous})
            return

    async def _ensure_loaded(self, state: ModelState, version: int) -> Served:
        if version in state.loaded:
            return state.loaded[version]
        if version in state.failed:
            raise unavailable("version_unavailable", f"model {state.name!r} version {version} cannot be served: {state.failed[version]}",
                              self.settings.retry_after_s)
        if self._closing:
            raise unavailable("shutting_down", "the service is shutting down", self.settings.retry_after_s)
        task = state.loading.get(version)
        if task is None:
            task = state.loading[version] = asyncio.create_task(self._load(state, version), name=f"load-{state.name}-{version}")
        return await asyncio.shield(task)

    async def _load(self, state: ModelState, version: int) -> Served:
        s = self.settings
        upscaler = Upscaler(self.store, state.name, version, self.device, s.max_batch_images, self.precision, s.png_compression,
                            s.max_forward_pixels)
        if s.cpu_forward != "auto":
            upscaler.cpu_forwards = (s.cpu_forward,)
        upscaler.forward_choices = self.forward_choices
        started = time.perf_counter()
        try:
            await asyncio.to_thread(upscaler.setup)
        except Exception as exc:  # whatever a bad version does, it must not take the service down
            self._record_failure(state, version, f"{type(exc).__name__}: {exc}")
            raise unavailable("version_unavailable", f"model {state.name!r} version {version} cannot be served: {state.failed[version]}",
                              s.retry_after_s) from None
        finally:
            state.loading.pop(version, None)
        batcher = Batcher(f"{state.name}:{version}", upscaler.run_batch, max_batch_images=s.max_batch_images, max_wait_ms=s.max_wait_ms, idle_dispatch=s.idle_dispatch,
                          max_queue_images=s.max_queue_images, retry_after_s=s.retry_after_s, metrics=self.metrics,
                          model=state.name, version=version, fixed_cost_s=upscaler.fixed_cost_s,
                          batch_limit=upscaler.batch_limit if upscaler.any_size else None, tracer=self.tracer)
        served = state.loaded[version] = Served(state.name, version, upscaler.manifest, batcher, upscaler.any_size, upscaler.halo)
        state.manifests[version] = upscaler.manifest
        log.info("loaded version", extra={"model": state.name, "version": version, "device": str(self.device),
                                          "seconds": round(time.perf_counter() - started, 3),
                                          "fixed_cost_ms": round(upscaler.fixed_cost_s * 1000, 3), "precision": self.precision,
                                          "memory_format": str(upscaler.memory_format).removeprefix("torch."), "forward": upscaler.forward,
                                          "forward_source": upscaler.forward_source})
        self._update_gauges(state)
        # A loaded model is thousands of long-lived objects: move them out of the collector's
        # reach, or every full collection walks them (measured: ~200 ms pauses -> ~2 ms).
        gc.collect()
        gc.freeze()
        return served

    def _record_failure(self, state: ModelState, version: int, reason: str) -> None:
        state.failed[version] = scrub_text(reason)  # it is quoted in HTTP answers: no host paths there (the log keeps them)
        self.metrics.load_failures.labels(state.name, str(version)).inc()
        log.error("version refused", extra={"model": state.name, "version": version, "reason": reason})

    # ---- unloading ----------------------------------------------------------------
    def _evict(self, state: ModelState) -> None:
        extras = sorted((s for v, s in state.loaded.items() if v not in state.pinned()), key=lambda s: s.last_used)
        for served in extras[: max(0, len(extras) - self.settings.extra_loaded_versions)]:
            self._retire(state, served)

    def _retire(self, state: ModelState, served: Served) -> None:
        """Stop routing to `served`; shut it down once the requests holding it have answered."""
        state.loaded.pop(served.version, None)

        async def drain() -> None:
            await served.released.wait()
            await served.batcher.close()
            log.info("unloaded version", extra={"model": served.name, "version": served.version})

        task = asyncio.create_task(drain(), name=f"retire-{served.name}-{served.version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        self._update_gauges(state)

    def _update_gauges(self, state: ModelState) -> None:
        self.metrics.loaded_versions.labels(state.name).set(len(state.loaded))
        if state.serving is not None:
            self.metrics.serving_version.labels(state.name).set(state.serving)

    # ---- requests -----------------------------------------------------------------
    async def resolve(self, name: str | None, version: str) -> tuple[ModelState, int]:
        """(model, version-or-alias) from a request -> state and version number, or 404/503."""
        name = name or self.default_model
        if name is None:
            raise unavailable("no_model_loaded", "no model is loaded from the store yet", self.settings.retry_after_s)
        state = await self.model_state(name)
        return state, await self.version_number(state, version)

    async def model_state(self, name: str) -> ModelState:
        state = self.models.get(name) or await self._rescan(name)
        if state is None:
            raise ApiError(404, "model_not_found", f"model {echo(name)} not found in the store (models: {sorted(self.models)})")
        return state

    async def version_number(self, state: ModelState, version: str) -> int:
        number = self._lookup(state, version)
        if number is None:
            state = await self._rescan(state.name) or state
            number = self._lookup(state, version)
        if number is None and version == LATEST:
            failures = "; ".join(f"version {v}: {why}" for v, why in sorted(state.failed.items()))
            raise unavailable("version_unavailable" if failures else "no_model_loaded",
                              f"model {state.name!r} has no loadable version" + (f" ({failures})" if failures else " yet"),
                              self.settings.retry_after_s)
        if number is None:
            raise ApiError(404, "version_not_found", f"model {state.name!r} has no version or alias {echo(version)} "
                                                     f"(versions: {state.versions}, aliases: {sorted(state.aliases)})")
        return number

    @staticmethod
    def _lookup(state: ModelState, version: str) -> int | None:
        if version == LATEST:
            return state.serving
        number = parse_version(version)
        if number is not None:
            return number if number in state.versions else None
        return state.aliases.get(version)

    @contextlib.asynccontextmanager
    async def lease(self, name: str | None, version: str) -> AsyncIterator[Served]:
        """The `Served` version for a request, kept alive until the request has answered."""
        state, number = await self.resolve(name, version)
        served = await self._ensure_loaded(state, number)
        served.leases += 1
        served.released.clear()
        served.last_used = time.monotonic()
        try:
            yield served
        finally:
            served.leases -= 1
            if served.leases == 0:
                served.released.set()

    async def set_alias(self, name: str, alias: str, version: str) -> int:
        state, number = await self.resolve(name, version)
        if number in state.failed:
            raise ApiError(409, "version_failed", f"model {name!r} version {number} failed verification and cannot be promoted: {state.failed[number]}")
        try:
            await asyncio.to_thread(self.store.set_alias, name, alias, number)
        except ValueError as exc:
            raise ApiError(422, "invalid_alias", str(exc)) from None
        except StoreUnavailable:
            raise unavailable("store_unavailable", "the model store cannot be written right now", self.settings.retry_after_s) from None
        await self._rescan(name)
        log.info("alias set", extra={"model": name, "alias": alias, "version": number})
        with contextlib.suppress(ApiError):
            await self._ensure_loaded(state, number)
        return number

    @property
    def store_reachable(self) -> bool:
        return not self._store_down

    def is_ready(self) -> bool:
        state = self.models.get(self.default_model or "")
        return state is not None and state.serving in state.loaded
