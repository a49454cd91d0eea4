"""Measurements behind the README's speed figures, each runnable as ``python -m skinml.benchmarks.NAME``.

- ``backbones``: CPU cost of a cnn_fusion training step per EfficientNet-Lite backbone;
- ``augment``: per-sample DataLoader augmentation vs :class:`skinml.training.augment.BatchAugment`;
- ``explain_latency``: the extra latency of ``params {"explain": true}`` in the served model.

They time on whatever machine runs them: run them alone, and report the machine.
"""
