"""Prometheus metrics on a per-app registry (two apps in one process never share counters).

With several workers (UPGRADER_WORKERS > 1) `python -m service` sets PROMETHEUS_MULTIPROC_DIR
before the workers start: every process then writes its values to files there, and /metrics,
whichever worker answers it, adds up all of them.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

UNKNOWN_MODEL = "-"  # label for requests that named no servable model (client text never becomes a label)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("upgrader_requests", "Inference requests (POST /upscale and /v2 .../infer) by model and HTTP status.", ["model", "status"], registry=r)
        self.latency = Histogram("upgrader_request_seconds", "Inference request latency (/upscale and /v2 infer), from request to response.", ["model"], registry=r,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batch_size = Histogram("upgrader_batch_images", "Images per forward pass.", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.inference_seconds = Histogram("upgrader_inference_seconds", "Wall time of one batch: forward pass and PNG encoding.", ["model"], registry=r,
                                           buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        self.queue_images = Gauge("upgrader_queue_images", "Images waiting for a batch, per loaded version.", ["model", "version"], registry=r,
                                  multiprocess_mode="livesum")
        self.images_dropped = Counter("upgrader_images_dropped", "Queued images dropped before their forward pass, by why their answer was no longer "
                                      "wanted: client_gone, deadline, cancelled, failed (an earlier batch of the request failed).", ["model", "reason"], registry=r)
        self.images = Counter("upgrader_images_served", "Images upscaled and returned.", ["model"], registry=r)
        self.load_failures = Counter("upgrader_model_load_failures", "Versions that failed verification or loading.", ["model", "version"], registry=r)
        self.serving_version = Gauge("upgrader_serving_version", "Version answering version=latest, per model.", ["model"], registry=r,
                                     multiprocess_mode="livemax")
        self.store_up = Gauge("upgrader_store_up", "1 if the last scan of the model store succeeded, else 0.", registry=r,
                              multiprocess_mode="livemin")
        self.store_errors = Counter("upgrader_store_errors", "Scans of the model store that failed (unreachable, denied, ...).", registry=r)
        self.loaded_versions = Gauge("upgrader_loaded_versions", "Versions loaded in memory, per model.", ["model"], registry=r,
                                     multiprocess_mode="livemax")

        # Children of the per-request series, looked up once: labels() validates and locks on every call,
        # and every inference request updates three of them (profiled under `bench/bench_triton.py`).
        self._request_series: dict[tuple[str, int], tuple] = {}

    def request_done(self, model: str, status: int, seconds: float, images: int = 0) -> None:
        """One inference request answered: counted by model and status, its latency observed, its images counted."""
        series = self._request_series.get((model, status))
        if series is None:
            series = self._request_series[(model, status)] = (
                self.requests.labels(model, str(status)), self.latency.labels(model), self.images.labels(model))
        requests, latency, served = series
        requests.inc()
        latency.observe(seconds)
        if images:
            served.inc(images)

    @staticmethod
    def multiprocess() -> bool:
        return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

    def exposition(self) -> bytes:
        """The text format: this app's registry, or with several workers every worker's values combined."""
        if not self.multiprocess():
            return generate_latest(self.registry)
        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        return generate_latest(combined)

    def forget_version(self, model: str, version: str) -> None:
        """An unloaded version leaves the queue gauge (multi-process files cannot drop a series: it reads 0)."""
        if self.multiprocess():
            self.queue_images.labels(model, version).set(0)
        else:
            self.queue_images.remove(model, version)

    def process_exited(self) -> None:
        """Drop this worker's live gauges (queue depth, versions) from the combined view."""
        if self.multiprocess():
            multiprocess.mark_process_dead(os.getpid())
