"""Peak resident memory of the default model's training step, without data or MLflow.

``python -m skinml.benchmarks.train_memory [BATCH] [SIZE] [checkpoint]`` builds ``cnn_fusion`` (Lite0,
package weights; ``checkpoint``: with activation checkpointing), then runs three Adam steps on random channels-last tensors and prints the resident
memory after the import, after building the model, and the process's peak (``ru_maxrss``): the
part of a training run's memory that is the model's own (activations of one forward + backward).
"""

from __future__ import annotations

import sys


def main(batch: int = 32, size: int = 224, checkpoint: bool = False, steps: int = 3) -> dict[str, float]:
    import psutil
    import torch

    process = psutil.Process()

    def mb() -> float:
        return process.memory_info().rss / 2**20

    torch.set_num_threads(1)
    out = {"after_import_mb": mb()}
    from skinml.models import create_model
    from skinml.training.fit import peak_rss_mb

    model = create_model("cnn_fusion", 40, pretrained="package").train().to(memory_format=torch.channels_last)
    model.set_grad_checkpointing(checkpoint)
    out["after_model_mb"] = mb()
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    for _ in range(steps):
        image = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
        loss = model(image, torch.randn(batch, 40)).logsumexp(1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    out["peak_mb"] = peak_rss_mb()
    print(f"batch {batch} at {size}px{' (checkpointed)' if checkpoint else ''}: after import {out['after_import_mb']:.0f} MB, model {out['after_model_mb']:.0f} MB, "
          f"peak {out['peak_mb']:.0f} MB")
    return out


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]), checkpoint="checkpoint" in sys.argv[3:])
