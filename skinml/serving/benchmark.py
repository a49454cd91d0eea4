"""Latency and throughput of a running model server, next to the bare model's forward pass.

Sends real photos from a PAD-UFES-20 folder with their clinical fields: ``n_single``
one-image requests (median and 95th percentile latency) and ``n_batch`` requests of
``batch_size`` images (images per second); then times the registered model's own
``forward`` on the same images, already decoded, so the gap is the serving overhead
(JSON, base64, decoding, validation, HTTP).

:func:`soak` sends one request many times and records the server's resident memory, to tell a
leak (growth without bound) from an allocator that keeps freed memory (a plateau).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.serving.client import build_request, post_json, request_body


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def benchmark(url: str, data_dir: str | None, model_uri: str, n_single: int = 50, n_batch: int = 5,
              batch_size: int = 32, warmup: int = 3) -> dict[str, Any]:
    frame = load_metadata(data_dir).sort_values(schema.IMAGE_ID).reset_index(drop=True)
    rows = frame.head(max(n_single, batch_size))
    clinical = [{c: r[c] for c in schema.FEATURES if c != "biopsed"} for _, r in rows.iterrows()]
    endpoint = url.rstrip("/") + "/invocations"

    def post(start: int, count: int) -> float:
        body = request_body(build_request(list(rows["image_path"][start:start + count]),
                                          clinical[start:start + count]))
        tick = time.perf_counter()
        status, answer = post_json(endpoint, body)
        elapsed = time.perf_counter() - tick
        if status != 200:
            raise RuntimeError(f"server answered {status}: {str(answer)[:300]}")
        return elapsed

    for i in range(warmup):
        post(i % len(rows), 1)
    single = [post(i % len(rows), 1) for i in range(n_single)]
    batch = [post(0, batch_size) for _ in range(n_batch)]

    # The bare model: same photos and metadata, preprocessed once, forward pass only.
    import mlflow

    from skinml.data.transforms import prepare_image

    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    bundle = python_model.bundle
    images = torch.stack([prepare_image(p, bundle.image_config) for p in rows["image_path"][:batch_size]])
    images = images.contiguous(memory_format=torch.channels_last)
    metadata = torch.from_numpy(bundle.preprocessor.transform(rows.head(batch_size)))
    forward_single, forward_batch = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            bundle.model(images[:1], metadata[:1])
        for i in range(n_single):
            tick = time.perf_counter()
            bundle.model(images[i % batch_size:i % batch_size + 1], metadata[i % batch_size:i % batch_size + 1])
            forward_single.append(time.perf_counter() - tick)
        for _ in range(n_batch):
            tick = time.perf_counter()
            bundle.model(images, metadata)
            forward_batch.append(time.perf_counter() - tick)
    return {
        "single_request_median_ms": 1000 * statistics.median(single),
        "single_request_p95_ms": 1000 * _percentile(single, 95),
        f"batch{batch_size}_request_median_s": statistics.median(batch),
        f"batch{batch_size}_images_per_s": batch_size / statistics.median(batch),
        "forward_single_median_ms": 1000 * statistics.median(forward_single),
        "forward_single_p95_ms": 1000 * _percentile(forward_single, 95),
        f"forward_batch{batch_size}_median_s": statistics.median(forward_batch),
        f"forward_batch{batch_size}_images_per_s": batch_size / statistics.median(forward_batch),
        "n_single": n_single,
        "n_batch": n_batch,
        "torch_threads": torch.get_num_threads(),
    }


# -- soak: does the server's memory plateau? ----------------------------------------------


def server_rss(pid: int) -> int:
    """Resident memory in bytes of process ``pid`` and all its descendants (``mlflow models
    serve`` scores in a uvicorn child process)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            pass
    return total


def soak(url: str, body: dict, pid: int, n_requests: int = 1000, every: int = 100, warmup: int = 50,
         timeout: float = 60.0) -> dict[str, Any]:
    """Send ``body`` to ``url`` ``n_requests`` times, one after another, recording the server's
    RSS (``pid`` and its children) after the warm-up and then every ``every`` requests.

    Bounded: exactly ``warmup + n_requests`` requests, each with ``timeout``; any answer but 200
    stops the run with the server's message. ``growth`` is the last RSS over the post-warm-up RSS.
    """
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/invocations") else "/invocations")
    for _ in range(warmup):
        status, answer = post_json(endpoint, body, timeout)
        if status != 200:
            raise RuntimeError(f"server answered {status} during warm-up: {str(answer)[:300]}")
    samples = [(0, server_rss(pid))]
    latencies = []
    start = time.perf_counter()
    for i in range(1, n_requests + 1):
        tick = time.perf_counter()
        status, answer = post_json(endpoint, body, timeout)
        latencies.append(time.perf_counter() - tick)
        if status != 200:
            raise RuntimeError(f"server answered {status} at request {i}: {str(answer)[:300]}")
        if i % every == 0 or i == n_requests:
            samples.append((i, server_rss(pid)))
    baseline, last = samples[0][1], samples[-1][1]
    return {
        "requests": n_requests,
        "seconds": time.perf_counter() - start,
        "median_ms": 1000 * statistics.median(latencies),
        "rss_mb": [(i, round(rss / 2**20, 1)) for i, rss in samples],
        "post_warmup_mb": round(baseline / 2**20, 1),
        "last_mb": round(last / 2**20, 1),
        "max_mb": round(max(rss for _, rss in samples) / 2**20, 1),
        "growth": round(last / baseline, 3),
    }
