"""Where the training step's memory goes, block by block, and what recomputing it costs.

``python -m skinml.benchmarks.block_memory [BATCH] [SIZE] [ROUNDS]`` runs the default backbone
(``efficientnet_lite0``, training mode, channels-last, one thread) one block at a time and prints,
per block, the activations autograd keeps for the backward pass (distinct storages seen by
``torch.autograd.graph.saved_tensors_hooks``) and the block's forward CPU time (median of
ROUNDS, ``time.process_time``: meaningful on a shared machine). Activation checkpointing of a
block saves its memory and costs one more forward of it, so the MB-per-ms column says which
blocks would be worth checkpointing alone; then it times one whole training step (forward +
backward) without and with timm's checkpointing of every block.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def saved_bytes(fn, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward when running ``fn(x)``."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn(x.detach().requires_grad_(True))
    return sum(storages.values())


def cpu_ms(fn, rounds: int, *args) -> float:
    """Median process CPU time of ``fn(*args)`` in ms."""
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn(*args)
        times.append(time.process_time() - start)
    return 1000 * statistics.median(times)


def main(batch: int = 32, size: int = 224, rounds: int = 3) -> list[dict[str, float]]:
    import timm

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = timm.create_model("efficientnet_lite0").train().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    stem = torch.nn.Sequential(model.conv_stem, model.bn1)
    blocks = [("stem", stem)] + [(f"block {i}", b) for i, b in enumerate(b for stage in model.blocks for b in stage)]
    rows, h = [], x
    for name, block in blocks:
        inp = h
        with torch.no_grad():
            h = block(inp)
            ms = cpu_ms(block, rounds, inp)
        mb = saved_bytes(block, inp) / 2**20
        rows.append({"block": name, "channels": inp.shape[1], "side": inp.shape[-1], "saved_mb": mb, "forward_ms": ms})
    total = sum(r["saved_mb"] for r in rows)
    print(f"efficientnet_lite0, batch {batch} at {size} px, one thread")
    print(f"{'':10}{'input':>12}{'saved MB':>10}{'fwd ms CPU':>12}{'MB per ms':>11}{'cum. MB':>9}")
    cumulative = 0.0
    for r in rows:
        cumulative += r["saved_mb"]
        print(f"{r['block']:10}{r['channels']:>6} x {r['side']:<3}{r['saved_mb']:>10.0f}{r['forward_ms']:>12.0f}"
              f"{r['saved_mb'] / max(r['forward_ms'], 1e-9):>11.1f}{cumulative:>9.0f}")
    print(f"all blocks: {total:.0f} MB saved for backward, {sum(r['forward_ms'] for r in rows):.0f} ms CPU forward")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).logsumexp(1).mean().backward()

    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        step()  # warm-up
        print(f"training step, checkpointing {'on ' if checkpointing else 'off'}: {cpu_ms(step, rounds):.0f} ms CPU")
    return rows


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
