"""``BENCH_THREADS=1 python -m skinml.benchmarks.augment [RUNS]``: images/s, per-sample torchvision augmentation in 1 DataLoader worker vs BatchAugment, 257 -> 224, batch 32."""
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
from skimage.data import astronaut, chelsea, coffee
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from skinml.data.dataset import LesionDataset
from skinml.data.transforms import AugmentConfig, ImageConfig, build_train_transform
from skinml.training.augment import BatchAugment

threads = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(threads)
runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
n = 256  # 8 batches of 32 per run
rng = np.random.default_rng(0)
photos = [TF.resize(torch.from_numpy(np.ascontiguousarray(p)).permute(2, 0, 1), [257, 257], antialias=True)
          for p in (chelsea(), coffee(), astronaut())]
images = np.stack([photos[i % 3].permute(1, 2, 0).numpy() for i in range(n)])  # NHWC uint8, like the decode cache
metadata = np.zeros((n, 21), np.float32)
labels = np.zeros(n, np.int64)
ic = ImageConfig(image_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
ac = AugmentConfig()

def cpu_seconds():
    # This process and its finished children (DataLoader workers are joined after each epoch).
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

cpu = {}

def timed(name, body):
    c, t = cpu_seconds(), time.perf_counter()
    body()
    cpu.setdefault(name, []).append((cpu_seconds() - c) / n * 1000)
    return n / (time.perf_counter() - t)

def per_sample_loader():
    ds = LesionDataset(images, metadata, labels, build_train_transform(ic, ac))
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=1, persistent_workers=False,
                        generator=torch.Generator().manual_seed(0))
    def body():
        for _batch in loader:
            pass
    return timed("per-sample", body)

augment = BatchAugment(ic, ac)
def batched_from_loader():
    ds = LesionDataset(images, metadata, labels, None)  # uint8 batches, collated in the main process
    loader = DataLoader(ds, batch_size=32, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    def body():
        for image, _, _ in loader:
            augment(image, g)
    return timed("batched+loader", body)

batch = torch.from_numpy(images[:32]).permute(0, 3, 1, 2).contiguous()
def batched_only():
    g = torch.Generator().manual_seed(0)
    def body():
        for _ in range(n // 32):
            augment(batch, g)
    return timed("batched only", body)

print("threads", threads, "loadavg", os.getloadavg(), flush=True)
results = {"per-sample DataLoader, 1 worker": [], "batched (uint8 loader + BatchAugment, main process)": [],
           "batched (BatchAugment only)": []}
batched_only()  # warm-up, not counted
cpu.clear()
for r in range(runs):
    for name, fn in zip(results, (per_sample_loader, batched_from_loader, batched_only), strict=True):
        results[name].append(fn())
    print("run", r, {k: [round(v, 1) for v in vs] for k, vs in results.items()}, "loadavg", os.getloadavg(), flush=True)
for name, values in results.items():
    print(f"{name}: median {statistics.median(values):.1f} images/s  runs={[round(v, 1) for v in values]}")
for name, values in cpu.items():
    print(f"CPU ms per image, {name}: median {statistics.median(values):.2f} runs={[round(v, 2) for v in values]}")
