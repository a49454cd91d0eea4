"""Single-photo latency of registered models, loaded in process as MLflow pyfuncs (no HTTP).

``python -m skinml.benchmarks.pyfunc_latency DATA_DIR MODEL_URI [MODEL_URI ...]`` loads each
model, sends the first photo of ``DATA_DIR/metadata.csv`` with two answers three times to warm
up, then times 30 ``predict`` calls and prints the median and 90th percentile.
"""

from __future__ import annotations

import statistics
import sys
import time


def main(data_dir: str, uris: list[str], n: int = 30) -> dict[str, float]:
    import mlflow

    from skinml import tracking
    from skinml.data.source import load_metadata
    from skinml.serving import client

    tracking.setup_tracking()
    row = load_metadata(data_dir).head(1)
    request = client.build_request([row["image_path"].iloc[0]], [{"age": 60, "region": "FACE"}])
    medians = {}
    for uri in uris:
        model = mlflow.pyfunc.load_model(uri)
        for _ in range(3):
            model.predict(request)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model.predict(request)
            times.append((time.perf_counter() - start) * 1000)
        medians[uri] = statistics.median(times)
        print(f"{uri}: median {medians[uri]:.1f} ms, p90 {sorted(times)[int(0.9 * n) - 1]:.1f} ms "
              f"({n} single-photo predicts in process)")
    return medians


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
