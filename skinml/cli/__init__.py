"""The ``skinml`` command: one group, its commands in modules by pipeline stage.

- :mod:`skinml.cli.data`: ``split``, ``synth``
- :mod:`skinml.cli.training`: ``train``, ``main``, ``study``, ``sweep``, ``cv``, ``cv-compare``, ``models``,
  ``benchmark-train``
- :mod:`skinml.cli.evaluation`: ``evaluate``, ``compare``, ``eval-compare``, ``ensemble``
- :mod:`skinml.cli.serving`: ``register``, ``predict``, ``score``, ``benchmark-serving``
- :mod:`skinml.cli.explain`: ``explain`` (heatmap overlay + metadata contributions for one photo)
- :mod:`skinml.cli.app`: ``app`` (the demo page), ``app-calibrate``
- :mod:`skinml.cli.server`: ``server start|stop|status`` (team tracking server on PostgreSQL)

Command modules import only :mod:`skinml.cli.common` (never this package), and import torch,
MLflow and the library inside the commands, so ``skinml --help`` answers at once.
"""

from __future__ import annotations

import importlib
import logging

import click

#: (module, command attribute names) registered on the group, in help order.
_COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("skinml.cli.data", ("split", "synth")),
    ("skinml.cli.training", ("train", "main_pipeline", "study", "sweep", "cv", "cv_compare", "list_models", "benchmark_train")),
    ("skinml.cli.evaluation", ("evaluate", "compare", "eval_compare", "ensemble")),
    ("skinml.cli.serving", ("register", "predict", "score", "benchmark_serving")),
    ("skinml.cli.explain", ("explain",)),
    ("skinml.cli.app", ("app", "app_calibrate")),
    ("skinml.cli.server", ("server",)),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """skinml: skin-lesion classification from photos and patient metadata (PAD-UFES-20)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow.store", "urllib3", "PIL", "matplotlib", "timm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from skinml.training.processes import exit_on_sigterm  # stdlib only: `skinml --help` stays quick

    exit_on_sigterm()  # a killed command's MLflow run ends FAILED instead of RUNNING for ever


for _module, _names in _COMMANDS:
    _loaded = importlib.import_module(_module)
    for _name in _names:
        cli.add_command(getattr(_loaded, _name))

__all__ = ["cli"]
