"""Latency and throughput of a running model server, next to the bare model's forward pass.

Sends real photos from a PAD-UFES-20 folder with their clinical fields: ``n_single``
one-image requests (median and 95th percentile latency) and ``n_batch`` requests of
``batch_size`` images (images per second); then times the registered model's own
``forward`` on the same images, already decoded, so the gap is the serving overhead
(JSON, base64, decoding, validation, HTTP).
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
