"""Names shared by the library and the command line, defined once and cheap to import.

The CLI builds its typed options (``click.Choice``) from these, so ``skinml --help`` needs no
torch; the library checks against the same tuples (and a test checks that the model registry
and the recipe presets agree with them).
"""

from __future__ import annotations

import warnings

#: Registered architectures, in the order ``skinml models`` lists them.
MODEL_NAMES: tuple[str, ...] = ("cnn_fusion", "spatial_fusion", "image_only", "metadata_only")
MODEL_FAMILIES: tuple[str, ...] = ("fusion", "baseline")

#: Recipe presets: ``default`` (``default_v2`` with mixup, chosen by cross-validation),
#: ``default_v2`` (the previous default, chosen on validation), ``default_lite2`` (it on Lite2 at
#: 260 px), ``default_lite2_224`` (it on Lite2 at 224 px), ``default_v1`` (the first default) and
#: ``original`` (the status report's).
RECIPE_PRESETS: tuple[str, ...] = (
    "default", "default_v2", "default_lite2", "default_lite2_224", "default_v1", "original")
IMBALANCE_CHOICES: tuple[str, ...] = ("sampler", "loss", "both", "none")
METADATA_ENCODINGS: tuple[str, ...] = ("ordinal", "onehot")
#: Where training augments: per image in DataLoader workers, or per batch on the training device.
AUGMENT_DEVICES: tuple[str, ...] = ("workers", "batch")
#: How evaluation sees a photo (Recipe.eval_view): squashed whole, or at the training scale + centre crop.
EVAL_VIEWS = ("squash", "crop")

#: Patient-level split strategies: class-stratified, or a plain random split of patient ids.
SPLIT_STRATEGIES: tuple[str, ...] = ("stratified", "random")
EVALUATION_SPLITS: tuple[str, ...] = ("test", "val")

#: Where runs land (``mlflow run`` and ``skinml`` alike) and what the registry calls the model.
EXPERIMENT_NAME = "skinml"
REGISTERED_MODEL_NAME = "skin-lesion-classifier"
CHAMPION_ALIAS = "champion"
SELECTION_METRIC = "best_val_bacc"

#: Old names kept for one release: "seed" meant the original recipe and the random split, which
#: collided with the RNG seed.
DEPRECATED_RECIPE_NAMES = {"seed": "original"}
DEPRECATED_SPLIT_STRATEGIES = {"seed": "random"}


def _canonical(name: str, deprecated: dict[str, str], what: str) -> str:
    if name in deprecated:
        new = deprecated[name]
        warnings.warn(f"{what} '{name}' is deprecated and will be removed in the next release; use '{new}'",
                      FutureWarning, stacklevel=4)
        return new
    return name


def canonical_recipe(name: str) -> str:
    """The preset name, mapping a deprecated one with a warning."""
    return _canonical(name, DEPRECATED_RECIPE_NAMES, "recipe")


def canonical_split_strategy(name: str) -> str:
    """The split strategy name, mapping a deprecated one with a warning."""
    return _canonical(name, DEPRECATED_SPLIT_STRATEGIES, "split strategy")
