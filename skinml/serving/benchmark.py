"""Latency and throughput of a running model server, next to the bare model's forward pass.

:func:`benchmark` sends real photos from a PAD-UFES-20 folder with their clinical fields, one
and ``batch_size`` at a time, and times each layer of a request on the same photos: the bare
forward pass, decoding + preprocessing, the model's whole ``predict`` in process, and the HTTP
round trip, so the gaps say what is ours and what is MLflow's scoring server.

:func:`soak` sends one request many times and records the server's resident memory, to tell a
leak (growth without bound) from an allocator that keeps freed memory (a plateau).
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import numpy as np
import torch

from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.serving.client import build_request, open_url, post_json, request_body


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_layers(layers: dict[str, Any], ks: list[int], warmup: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each layer on requests ``ks``, the layers taking turns in ``rounds``.

    Each layer is warmed up on the first ``warmup`` requests, then the requests are cut into
    ``rounds`` consecutive chunks and every layer times one chunk before the next layer does. A
    machine that slows down or speeds up during the benchmark (a shared VM, a neighbour's job)
    then touches every layer alike instead of only the layer timed at that moment, so the ratios
    between layers hold better than with one block per layer.
    """
    for call in layers.values():
        for k in ks[:warmup]:
            call(k)
    rounds = max(1, min(rounds, len(ks)))
    chunks = [ks[len(ks) * r // rounds:len(ks) * (r + 1) // rounds] for r in range(rounds)]
    times: dict[str, list[float]] = {layer: [] for layer in layers}
    for chunk in chunks:
        for layer, call in layers.items():
            for k in chunk:
                tick = time.perf_counter()
                call(k)
                times[layer].append(time.perf_counter() - tick)
    return times


def benchmark(url: str, data_dir: str | None, model_uri: str, n_single: int = 50, n_batch: int = 5,
              batch_size: int = 32, warmup: int = 3, rounds: int = 5) -> dict[str, Any]:
    """One request of 1 and of ``batch_size`` photos, timed layer by layer on the same photos.

    - ``forward``: the model on tensors already decoded (``inference_mode``);
    - ``decode``: JPEG bytes -> normalised tensor (:func:`prepare_image`, the serving path) plus
      the clinical encoding, i.e. what must happen to any photo before the forward pass;
    - ``pyfunc``: the registered model's ``predict`` in this process on the DataFrame the server
      hands it (base64 photos): our whole request path (validation, decoding, forward, answer);
    - ``handler``: MLflow's request handler in this process
      (``mlflow.pyfunc.scoring_server.invocations`` on the JSON body): ``pyfunc`` plus MLflow's
      JSON parsing, DataFrame, ``PyFuncModel.predict`` wrapper and JSON answer, without the web
      server;
    - ``http``: the round trip to ``url`` (the JSON body is built beforehand): ``handler`` plus
      the web server (uvicorn, FastAPI and its middleware, the hand-off to a pool thread) and
      the socket.

    Medians over ``n_single`` one-photo requests (cycling through the folder's photos, the same
    photos in every layer) and ``n_batch`` requests of the first ``batch_size`` photos, each
    layer after ``warmup`` calls, the layers taking turns in ``rounds`` (:func:`time_layers`).
    The server must run ``model_uri``: its answer to the first photo is compared with the
    in-process one, so the layers time the same model.
    """
    import json
    import urllib.error
    import urllib.request
    from pathlib import Path

    import mlflow
    import pandas as pd

    from skinml.data.transforms import prepare_image

    frame = load_metadata(data_dir).sort_values(schema.IMAGE_ID).reset_index(drop=True)
    rows = frame.head(max(n_single, batch_size))
    clinical = [{c: r[c] for c in schema.FEATURES if c != "biopsed"} for _, r in rows.iterrows()]
    endpoint = url.rstrip("/") + "/invocations"
    # Request k (of 1 + n_single): the single photos cycle through the folder; the last is the batch.
    spans = [(i % len(rows), 1) for i in range(max(n_single, 1))] + [(0, batch_size)]
    bodies, frames = [], []
    for start, count in spans:
        body = request_body(build_request(list(rows["image_path"][start:start + count]),
                                          clinical[start:start + count]))
        bodies.append(json.dumps(body).encode("utf-8"))
        # What MLflow's server passes to predict: the JSON's rows (nulls as None) as a DataFrame.
        frames.append(pd.DataFrame(body["dataframe_split"]["data"], columns=body["dataframe_split"]["columns"]))
    photos = [Path(p).read_bytes() for p in rows["image_path"]]  # what the server gets after base64

    def http(k: int) -> dict:
        request = urllib.request.Request(endpoint, data=bodies[k], method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with open_url(request, 120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"server answered {exc.code}: {exc.read()[:300]!r}") from None

    from mlflow.pyfunc import scoring_server

    pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    python_model = pyfunc_model.unwrap_python_model()
    input_schema = pyfunc_model.metadata.get_input_schema()

    def handler(k: int) -> None:
        answer = scoring_server.invocations(bodies[k], "application/json", pyfunc_model, input_schema)
        if answer.status != 200:
            raise RuntimeError(f"MLflow's handler answered {answer.status}: {str(answer.response)[:300]}")
    bundle = python_model.bundle
    served = http(0)["predictions"][0]
    local = python_model.predict(None, frames[0]).iloc[0]
    gap = max(abs(float(served[label]) - float(local[label])) for label in bundle.labels)
    if gap > 1e-4:
        raise RuntimeError(f"the server at {url} does not answer like {model_uri} (probabilities differ by "
                           f"{gap:.3g}); pass the --model-uri it serves")

    on_model_thread = model_thread(python_model)
    config = bundle.image_config  # None: a metadata-only model decodes no photo

    def tensors():
        images = (torch.stack([prepare_image(p, config) for p in photos]).contiguous(memory_format=torch.channels_last)
                  if config is not None else None)
        return images, torch.from_numpy(bundle.preprocessor.transform(rows))

    images, metadata = on_model_thread(tensors)

    encode = clinical_encoder(bundle.preprocessor)

    def decode(k: int) -> None:
        start, count = spans[k]
        for photo in photos[start:start + count] if config is not None else []:
            prepare_image(photo, config)
        encode(rows.iloc[start:start + count])

    def forward(k: int) -> None:
        start, count = spans[k]
        with torch.inference_mode():
            bundle.model(None if images is None else images[start:start + count], metadata[start:start + count])

    layers = {"forward": lambda k: on_model_thread(forward, k), "decode": lambda k: on_model_thread(decode, k),
              "pyfunc": lambda k: python_model.predict(None, frames[k]), "handler": handler, "http": http}
    out: dict[str, Any] = {}
    for name, ks, n in (("single", range(n_single), 1), (f"batch{batch_size}", [len(spans) - 1] * n_batch,
                                                         batch_size)):
        if not ks:
            continue
        for layer, times in time_layers(layers, list(ks), warmup, rounds).items():
            out[f"{layer}_{name}_median_ms"] = 1000 * statistics.median(times)
            out[f"{layer}_{name}_p95_ms"] = 1000 * _percentile(times, 95)
        bare = out[f"forward_{name}_median_ms"] + out[f"decode_{name}_median_ms"]
        out[f"ours_beyond_forward_decode_{name}_ms"] = out[f"pyfunc_{name}_median_ms"] - bare
        out[f"mlflow_server_{name}_ms"] = out[f"http_{name}_median_ms"] - out[f"pyfunc_{name}_median_ms"]
        # MLflow's part, split: its handler (JSON in and out, DataFrame, predict wrapper) and the
        # web server around it (uvicorn, FastAPI, thread hand-off, socket).
        out[f"mlflow_handler_{name}_ms"] = out[f"handler_{name}_median_ms"] - out[f"pyfunc_{name}_median_ms"]
        out[f"web_server_{name}_ms"] = out[f"http_{name}_median_ms"] - out[f"handler_{name}_median_ms"]
        out[f"http_over_forward_decode_{name}"] = out[f"http_{name}_median_ms"] / bare
        out[f"http_{name}_images_per_s"] = 1000 * n / out[f"http_{name}_median_ms"]
    out.update(n_single=n_single, n_batch=n_batch, batch_size=batch_size, rounds=rounds,
               torch_threads=torch.get_num_threads(),
               model_uri=model_uri, photo_pixels=int(np.median([_pixels(p) for p in photos])))
    return out


def clinical_encoder(preprocessor):
    """``frame`` -> encoded clinical fields, as the model's own request path encodes them.

    A model runs the code it was registered with: its preprocessor's module has
    :class:`~skinml.data.preprocess.ColumnTable` (the request path encodes column lists) or,
    registered before it, encodes the DataFrame; the decode layer times the same work.
    """
    import sys

    table = getattr(sys.modules.get(type(preprocessor).__module__), "ColumnTable", None)
    columns = list(preprocessor.input_columns)
    if table is None:
        return lambda frame: preprocessor.transform(frame)
    return lambda frame: preprocessor.transform(table.from_frame(frame, [c for c in columns if c in frame.columns]))


def model_thread(python_model):
    """A function that runs ``function(*args)`` on the model's own torch thread.

    The bare layers must run where the model's ``predict`` runs its torch work: torch work on
    another thread of this process makes a second OpenMP pool, and with more OpenMP threads than
    cores every layer slows down (measured: in-process ``predict`` 48-66 ms against 30-39 ms in a
    clean process). Models registered by skinml since the dedicated thread came in expose
    ``on_torch_thread``; the ones registered between its introduction and its rename call it
    ``_on_torch_thread`` (a registered model runs the code it was logged with). A model with no
    thread of its own runs ``predict`` on the caller's thread, so the layers do too.
    """
    for name in ("on_torch_thread", "_on_torch_thread"):
        runner = getattr(python_model, name, None)
        if callable(runner):
            return runner
    return lambda function, *args: function(*args)


def _pixels(photo: bytes) -> int:
    from PIL import Image

    with Image.open(io.BytesIO(photo)) as image:
        return image.size[0] * image.size[1]


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
