"""``python -m skinml.benchmarks.backbones [ROUNDS]``: cost of one training step (forward + backward, batch 32, native size) of cnn_fusion per Lite.

The machine is shared (load average ~10 on 2 cores), so wall time is mostly other people's
work: the figures that mean something are the FLOP count (exact) and the process CPU time on
one thread (what the step itself consumed), median over interleaved rounds.
"""
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from skinml.models import create_model

torch.manual_seed(0)
torch.set_num_threads(1)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
specs = (("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260))
models = {name: create_model("cnn_fusion", 21, backbone=name, pretrained="package").train() for name, _ in specs}
inputs = {name: (torch.randn(32, 3, s, s), torch.randn(32, 21), torch.randint(0, 6, (32,))) for name, s in specs}

def step(name):
    model, (x, m, y) = models[name], inputs[name]
    model.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x, m), y).backward()

flops = {}
for name, _ in specs:
    with FlopCounterMode(display=False) as counter:
        step(name)
    flops[name] = counter.get_total_flops()
print("loadavg", os.getloadavg(), flush=True)
cpu = {name: [] for name, _ in specs}
wall = {name: [] for name, _ in specs}
for r in range(rounds):
    for name, _ in specs:
        c, w = time.process_time(), time.perf_counter()
        step(name)
        cpu[name].append(time.process_time() - c)
        wall[name].append(time.perf_counter() - w)
    print("round", r, {k: round(v[-1], 2) for k, v in cpu.items()}, "loadavg", os.getloadavg(), flush=True)
base_cpu = statistics.median(cpu["efficientnet_lite0"])
for name, size in specs:
    params = sum(p.numel() for p in models[name].parameters())
    c = statistics.median(cpu[name])
    w = statistics.median(wall[name])
    print(f"{name} {size}px params={params:,} fwd+bwd batch32: {flops[name] / 1e9:.1f} GFLOP "
          f"({flops[name] / flops['efficientnet_lite0']:.2f}x), CPU {c:.2f} s on 1 thread "
          f"({c / base_cpu:.2f}x; cpu runs {[round(v, 2) for v in cpu[name]]}), wall median {w:.1f} s")
