"""Why the served model runs its torch work on one thread of its own.

``python -m skinml.benchmarks.torch_thread [plain|dedicated] [ROUNDS]`` builds the default
``cnn_fusion`` (Lite0, package weights) and times one-photo forward passes called the way
``mlflow models serve`` calls ``predict``: from ``asyncio.to_thread``. ``plain``: the model is
built on the main thread and run on whichever pool thread the call lands on; ``dedicated``: the
model is built and run on one dedicated thread (what
:class:`skinml.serving.pyfunc_model.SkinLesionClassifier` does). Prints the median in ms.
Run each mode in its own process: the OpenMP pools a process has made stay.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def main(mode: str = "dedicated", rounds: int = 40) -> float:
    import torch

    from skinml.models import create_model

    if mode not in ("plain", "dedicated"):
        raise SystemExit(f"mode must be 'plain' or 'dedicated', got {mode!r}")
    dedicated = ThreadPoolExecutor(1) if mode == "dedicated" else None

    def run(function, *args):
        return dedicated.submit(function, *args).result() if dedicated else function(*args)

    def build():  # every torch call of the process on the chosen thread, inputs included
        return create_model("cnn_fusion", 40, pretrained="package").eval(), torch.randn(1, 3, 224, 224), torch.randn(1, 40)

    model, image, metadata = run(build)

    def forward():
        with torch.inference_mode():
            model(image, metadata)

    async def timed() -> float:
        for _ in range(5):
            await asyncio.to_thread(run, forward)
        times = []
        for _ in range(rounds):
            tick = time.perf_counter()
            await asyncio.to_thread(run, forward)
            times.append(time.perf_counter() - tick)
        return 1000 * statistics.median(times)

    median = asyncio.run(timed())
    print(f"{mode}: median {median:.1f} ms per one-photo forward pass through asyncio.to_thread "
          f"({torch.get_num_threads()} torch threads)")
    return median


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dedicated", int(sys.argv[2]) if len(sys.argv) > 2 else 40)
