"""/healthz, /readyz and /metrics of a live server, read with Prometheus' own text parser.

Each server started here has its own metrics registry, so counts are exact; the prompt cache belongs to the
session's shared pipeline, so only its direction is checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import RunningServer

STEPS = 4  # the distilled tiny model's default


def samples(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from GET /metrics."""
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_health_readiness_and_metrics_after_two_jobs(start_server: Callable[..., RunningServer]) -> None:
    server = start_server()
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        deadline = time.monotonic() + 30
        while (ready := http.get("/readyz")).status_code == 503:  # until the engine's warm-up ran
            assert ready.json() == {"status": "not ready", "reason": "starting: the model is warming up"}
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.02)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "model": server.pipeline.spec.name}

        body = {"model": "flux-2-klein-4b", "prompt": "metrics: a red square", "size": "256x256"}
        ids = []
        for seed in (1, 2):  # the same prompt twice: the second one's embedding comes from the cache
            answer = http.post("/v1/images/generations", json={**body, "seed": seed})
            assert answer.status_code == 200, answer.text
            ids.append(answer.json()["id"])
        engine_seconds = sum(http.get(f"/v1/jobs/{i}").json()["usage"]["engine_seconds"] for i in ids)
        metric = samples(http)

    def value(name: str, **labels: str) -> float:
        return metric[(name, tuple(sorted(labels.items())))]

    assert value("kleinserve_jobs_total", status="succeeded") == 2
    assert value("kleinserve_queue_depth") == 0
    for histogram in ("queue_wait", "text_encoding", "vae_decode", "image_encoding"):
        assert value(f"kleinserve_{histogram}_seconds_count") == 2, histogram
        assert value(f"kleinserve_{histogram}_seconds_sum") > 0, histogram
    assert value("kleinserve_batch_images_count") == 2 and value("kleinserve_batch_images_sum") == 2
    assert value("kleinserve_denoising_step_seconds_count") == 2 * STEPS
    # A step's time is the model call and scheduler step alone: the steps fit in what the engine spent
    # besides text encoding and decoding (the first step once also counted the text encoding before it).
    text, decode = value("kleinserve_text_encoding_seconds_sum"), value("kleinserve_vae_decode_seconds_sum")
    rounding = 2 * 0.0005  # usage.engine_seconds is rounded to the millisecond
    assert 0 < value("kleinserve_denoising_step_seconds_sum") <= engine_seconds - text - decode + rounding
    assert 0 < value("kleinserve_prompt_cache_hit_ratio") <= 1
