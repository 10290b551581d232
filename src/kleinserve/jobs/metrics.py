"""Prometheus metrics of one server: queue, jobs, stage timings, batch sizes, prompt cache.

Each server has its own registry (tests run several servers in one process); `/metrics` renders it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kleinserve.engine.protocol import Engine

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """A process's instruments; `engine.stats()` is read whenever /metrics renders (an API process that runs
    no engine has none, and no prompt cache figure)."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("kleinserve_queue_depth", "jobs waiting for the engine", registry=r)
        self.jobs = Counter("kleinserve_jobs", "jobs that reached a status", ["status"], registry=r)
        self.queue_wait = Histogram(
            "kleinserve_queue_wait_seconds", "submit to start", buckets=_SECONDS, registry=r
        )
        self.text_encoding = Histogram(
            "kleinserve_text_encoding_seconds", "prompt encoding per batch", buckets=_SECONDS, registry=r
        )
        self.step = Histogram(
            "kleinserve_denoising_step_seconds", "one denoising step", buckets=_SECONDS, registry=r
        )
        self.vae_decode = Histogram(
            "kleinserve_vae_decode_seconds", "VAE decode per batch", buckets=_SECONDS, registry=r
        )
        self.image_encoding = Histogram(
            "kleinserve_image_encoding_seconds",
            "PNG/JPEG/WebP encoding per image",
            buckets=_SECONDS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kleinserve_batch_images",
            "images per engine batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        if engine is not None:
            hit_ratio = Gauge(
                "kleinserve_prompt_cache_hit_ratio", "prompt embedding cache hits / lookups", registry=r
            )
            hit_ratio.set_function(lambda: engine.stats().prompt_cache_hit_ratio)

    def render(self) -> bytes:
        return generate_latest(self.registry)
