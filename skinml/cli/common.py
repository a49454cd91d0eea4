"""What every command group shares: error handling, typed options, and MLproject's empty strings.

Nothing here imports torch or MLflow: ``skinml --help`` and option errors must answer at once.
"""

from __future__ import annotations

import functools
from typing import Any

import click

from skinml import constants


def friendly_errors(func):
    """Show expected failures (bad data, bad options, offline downloads) as one clear line."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from skinml.data.images import ImageError
        from skinml.data.preprocess import MetadataError
        from skinml.data.source import DatasetError

        expected: tuple[type[BaseException], ...] = (DatasetError, ImageError, MetadataError, ValueError,
                                                     FileNotFoundError)
        try:
            return func(*args, **kwargs)
        except expected as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # Offline weights and unknown runs are user-facing conditions, not crashes.
            name = type(exc).__name__
            if name in ("PretrainedWeightsUnavailable", "MlflowException", "RegistryError", "RunNotFound"):
                message = getattr(exc, "message", None) or str(exc)
                raise click.ClickException(f"{name}: {message}") from exc
            raise

    return wrapper


def empty_to_none(_ctx, _param, value):
    """MLproject passes unset optional parameters as empty strings."""
    return value if value not in ("", ()) else None


class Optional(click.ParamType):
    """``inner``, or None for an empty string (how MLproject passes an unset parameter)."""

    def __init__(self, inner: click.ParamType) -> None:
        self.inner = inner
        self.name = inner.name

    def convert(self, value: Any, param, ctx) -> Any:
        if value is None or value == "":
            return None
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None) -> str | None:  # click 8.1 and 8.2 signatures
        try:
            return self.inner.get_metavar(param, ctx)
        except TypeError:
            return self.inner.get_metavar(param)

    def shell_complete(self, ctx, param, incomplete):
        return self.inner.shell_complete(ctx, param, incomplete)


OPT_INT = Optional(click.INT)
OPT_FLOAT = Optional(click.FLOAT)
OPT_BOOL = Optional(click.BOOL)


def choice(values, *, deprecated: dict[str, str] | None = None, optional: bool = False) -> click.ParamType:
    """A ``click.Choice`` of ``values`` (old names in ``deprecated`` still accepted)."""
    base = click.Choice([*values, *(deprecated or {})])
    return Optional(base) if optional else base


def recipe_name(_ctx, _param, value):
    return constants.canonical_recipe(value) if value else "default"


def split_strategy(_ctx, _param, value):
    return constants.canonical_split_strategy(value) if value else "stratified"


def device_type(_ctx, _param, value):
    """auto, cpu, cuda or cuda:N (checked here so a typo fails before any work)."""
    value = value or "auto"
    if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise click.BadParameter(f"{value!r} is not a device; use auto, cpu, cuda or cuda:N")


data_dir_option = click.option(
    "--data-dir", default=None, callback=empty_to_none,
    help="PAD-UFES-20 folder (else $SKINML_DATA_DIR, else a kagglehub download).",
)
experiment_option = click.option(
    "--experiment", "--experiment-name", "experiment", default=None, callback=empty_to_none, envvar="MLFLOW_EXPERIMENT_NAME",
    help=f"MLflow experiment (default '{constants.EXPERIMENT_NAME}', or $MLFLOW_EXPERIMENT_NAME; "
         "inside `mlflow run` its own --experiment-name decides).")
device_option = click.option("--device", default="auto", show_default=True, callback=device_type,
                             help="auto, cpu, cuda or cuda:N.")
model_name_option = click.option(
    "--name", default=constants.REGISTERED_MODEL_NAME, show_default=True,
    callback=lambda _ctx, _param, value: value or constants.REGISTERED_MODEL_NAME, help="Registered model name.")


def recipe_options(func):
    """Options that override a recipe preset; unset ones keep the preset's value."""
    options = [
        click.option("--recipe", default="default", show_default=True, callback=recipe_name,
                     type=choice(constants.RECIPE_PRESETS, deprecated=constants.DEPRECATED_RECIPE_NAMES, optional=True),
                     help="Preset: default (default_v2 with mixup, chosen by cross-validation), default_v2 "
                          "(the previous default, chosen on validation), default_lite2 (default_v2 on "
                          "Lite2 at 260 px), default_lite2_224 (default_v2 on Lite2 at 224 px), "
                          "default_v1 (the first default) or original (the status report's)."),
        click.option("--model", default="cnn_fusion", show_default=True, type=click.Choice(constants.MODEL_NAMES)),
        click.option("--backbone", default=None, callback=empty_to_none, help="timm backbone name."),
        click.option("--pretrained", default=None, callback=empty_to_none,
                     help="auto, none, package, timm or a weights file."),
        click.option("--imbalance", default=None, type=choice(constants.IMBALANCE_CHOICES, optional=True)),
        click.option("--epochs", default=None, type=OPT_INT),
        click.option("--batch-size", default=None, type=OPT_INT),
        click.option("--lr-backbone", default=None, type=OPT_FLOAT),
        click.option("--lr-head", default=None, type=OPT_FLOAT),
        click.option("--weight-decay", default=None, type=OPT_FLOAT),
        click.option("--label-smoothing", default=None, type=OPT_FLOAT),
        click.option("--image-size", default=None, type=OPT_INT),
        click.option("--early-stopping-patience", default=None, type=OPT_INT),
        click.option("--include-biopsed", default=None, type=OPT_BOOL,
                     help="true reproduces the original 22 features (biopsed is a label proxy)."),
        click.option("--missing-indicators", default=None, type=OPT_BOOL),
        click.option("--metadata-encoding", default=None, type=choice(constants.METADATA_ENCODINGS, optional=True)),
        click.option("--grad-checkpointing", default=None, type=OPT_BOOL,
                     help="true: recompute the backbone's activations in backward (training memory 4.6 -> 2.9 GB "
                          "on CPU, same result, slower)."),
        click.option("--set", "extra", multiple=True, metavar="KEY=VALUE",
                     help="Any other recipe field, e.g. --set augment_rotation=10 --set optimizer=adamw."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def parse_pairs(items, option: str) -> dict[str, str]:
    """``KEY=VALUE`` items -> dict, naming the option and item that is malformed."""
    bad = [item for item in items if "=" not in item]
    if bad:
        raise click.BadParameter(f"expects KEY=VALUE, got {bad}", param_hint=option)
    return dict(item.split("=", 1) for item in items)


def build_recipe(recipe: str, extra: tuple[str, ...], **overrides):
    """The resolved recipe (a preset, then the typed options, then ``--set`` pairs)."""
    import json

    from skinml.training.recipe import resolve_recipe

    for key, value in parse_pairs(extra, "--set").items():
        overrides[key.replace("-", "_")] = json.loads(value) if key == "model_options" else value
    return resolve_recipe(recipe, **overrides)
