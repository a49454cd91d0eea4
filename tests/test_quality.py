"""Model-quality machinery: one geometry for training and evaluation, flip TTA, ensembles,
the permutation ("neutral") metadata arm."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from skinml import inference
from skinml.data import schema
from skinml.data.image_config import AugmentConfig, ImageConfig
from skinml.data.images import open_image, resize_to_array
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.transforms import build_train_transform, prepare_image, uint8_to_tensor
from skinml.models import create_model
from skinml.training.augment import BatchAugment
from skinml.training.prepare import build_model
from skinml.training.recipe import resolve_recipe

PHOTO_W, PHOTO_H = 600, 400
DISC = 150  # disc radius in photo pixels, horizontally and vertically


def _disc_photo() -> bytes:
    image = Image.new("RGB", (PHOTO_W, PHOTO_H), (0, 0, 0))
    cx, cy = PHOTO_W // 2, PHOTO_H // 2
    ImageDraw.Draw(image).ellipse((cx - DISC, cy - DISC, cx + DISC, cy + DISC), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _disc_width(chw: torch.Tensor) -> int:
    """Bright pixels on the middle row of a (3, S, S) view (normalised or uint8)."""
    row = chw[0, chw.shape[1] // 2].float()
    return int((row > row.min() + (row.max() - row.min()) / 2).sum())


#: Only the crop is random: the other augmentations would change the measured width.
GEOMETRY_ONLY = AugmentConfig(resize=257, hflip=0, vflip=0, brightness=0, contrast=0, saturation=0, hue=0,
                              rotation=0, translate=0, scale=(1.0, 1.0), blur_kernel=0, blur_p=0, erasing_p=0)


def _training_views(config: ImageConfig, n: int = 8, augment: AugmentConfig = GEOMETRY_ONLY) -> list[torch.Tensor]:
    photo = open_image(_disc_photo())
    # decoded as the training loader decodes it (skinml.training.prepare.build_loaders)
    decoded = uint8_to_tensor(resize_to_array(photo, augment.decode_size(config.image_size)))
    torch.manual_seed(0)
    per_image = [build_train_transform(config, augment)(decoded) for _ in range(n)]
    batched = BatchAugment(config, augment)(decoded[None].repeat(n, 1, 1, 1), torch.Generator().manual_seed(0))
    return per_image + list(batched)


def _view_config(synthetic_dir, **options) -> ImageConfig:
    """The image view a tiny default-recipe cnn_fusion gets from build_model with ``options``."""
    recipe = resolve_recipe("default", model="cnn_fusion", backbone="test_efficientnet", pretrained="none", **options)
    return build_model(recipe, MetadataPreprocessor(False, False).fit(_frame(synthetic_dir)))[1]


def test_crop_view_shows_the_lesion_at_the_training_scale(synthetic_dir):
    config = _view_config(synthetic_dir, eval_view="crop", augment_resize=257, image_size=224)
    assert (config.resize, config.decode_size, config.image_size) == (257, 257, 224)
    widths = {_disc_width(view) for view in _training_views(config)}
    evaluated = _disc_width(prepare_image(_disc_photo(), config))
    # The disc spans 300 of the photo's 600 px: 128.5 px at the 257-px training scale.
    assert all(abs(w - 128.5) <= 1.5 for w in widths), widths
    assert abs(evaluated - 128.5) <= 1.5
    assert max(abs(evaluated - w) for w in widths) <= 2


def test_squash_view_is_the_smaller_scale_the_crop_view_fixes():
    config = ImageConfig(image_size=224)  # resize=0: the original design
    widths = {_disc_width(view) for view in _training_views(config)}
    evaluated = _disc_width(prepare_image(_disc_photo(), config))
    assert abs(evaluated - 112) <= 1.5  # 300 / 600 * 224
    assert min(abs(evaluated - w) for w in widths) >= 14  # 12% smaller than every training view


@pytest.mark.parametrize("resize", [224, 0])
def test_training_on_the_whole_photo_matches_the_squash_view(synthetic_dir, resize):
    # The other way to one geometry: train at the evaluation scale (augment_resize = image_size,
    # or 0 for "whatever image_size is": no random crop), evaluate on the squashed whole photo.
    config = _view_config(synthetic_dir, augment_resize=resize, image_size=224)
    assert (config.resize, config.decode_size, config.image_size) == (0, 224, 224)
    whole = dataclasses.replace(GEOMETRY_ONLY, resize=resize)
    views = _training_views(config, augment=whole)
    evaluated = prepare_image(_disc_photo(), config)
    assert abs(_disc_width(evaluated) - 112) <= 1.5  # 300 / 600 * 224
    assert all(abs(_disc_width(view) - _disc_width(evaluated)) <= 1 for view in views)
    # without the random crop every geometry-only training view (per image and batched) is the
    # evaluated image itself
    assert all(torch.allclose(view, evaluated, atol=1e-5) for view in views)


def test_image_config_round_trip_and_old_checkpoints():
    config = ImageConfig(image_size=224, resize=257)
    assert ImageConfig.from_dict(config.to_dict()) == config
    assert config.crop_offset == 16  # torchvision CenterCrop: round(33 / 2)
    old = {k: v for k, v in config.to_dict().items() if k != "resize"}
    assert ImageConfig.from_dict(old).resize == 0  # checkpoints from before the option squash
    with pytest.raises(ValueError, match="resize"):
        ImageConfig(image_size=224, resize=200)


def test_recipe_rejects_an_unknown_view():
    with pytest.raises(ValueError, match="eval_view must be one of"):
        resolve_recipe("default", eval_view="zoom")


# -- averaged models: TTA and ensembles -----------------------------------------------------------


def _frame(synthetic_dir, n: int = 12) -> pd.DataFrame:
    from skinml.data.source import load_metadata

    return load_metadata(str(synthetic_dir)).head(n).reset_index(drop=True)


def _members(k: int, n_features: int) -> list[torch.nn.Module]:
    members = []
    for seed in range(k):
        torch.manual_seed(seed)
        members.append(create_model("cnn_fusion", n_features, backbone="test_efficientnet", pretrained="none").eval())
    return members


def test_ensemble_probabilities_are_the_mean_of_its_members():
    torch.manual_seed(0)
    image, metadata = torch.randn(5, 3, 32, 32), torch.randn(5, 7)
    members = _members(3, 7)
    each = [torch.softmax(m(image, metadata), 1) for m in members]
    ensemble = inference.AveragedModel(members)
    with torch.no_grad():
        got = torch.softmax(ensemble(image, metadata), 1)
    torch.testing.assert_close(got, torch.stack(each).mean(0).detach(), rtol=1e-5, atol=1e-6)
    # and not any one member's
    assert all((got - p.detach()).abs().max() > 1e-4 for p in each)


def test_flip_tta_averages_the_four_flips():
    torch.manual_seed(1)
    image, metadata = torch.randn(4, 3, 32, 32), torch.randn(4, 7)
    model = _members(1, 7)[0]
    flips = [image, image.flip(-1), image.flip(-2), image.flip((-2, -1))]
    with torch.no_grad():
        expected = torch.stack([torch.softmax(model(v, metadata), 1) for v in flips]).mean(0)
        got = torch.softmax(inference.AveragedModel([model], "flips")(image, metadata), 1)
        plain = torch.softmax(model(image, metadata), 1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got - plain).abs().max() > 1e-4


def test_ensemble_checkpoint_round_trip_and_mismatch(tiny_training, tmp_path, synthetic_dir):
    state = inference.load_checkpoint(tiny_training.checkpoint)
    other = dict(state, model_state={k: v + 0.01 if v.is_floating_point() else v
                                     for k, v in state["model_state"].items()})
    saved = inference.save_checkpoint(inference.ensemble_state([state, other], "flips", ["run-a", "run-b"]),
                                      tmp_path / "ensemble.pt")
    bundle = inference.load_bundle(saved)
    assert isinstance(bundle.model, inference.AveragedModel)
    assert len(bundle.model.members) == 2 and bundle.model.tta == "flips"
    frame = _frame(synthetic_dir, 6)
    images = torch.rand(6, 3, bundle.image_config.image_size, bundle.image_config.image_size)
    metadata = torch.as_tensor(bundle.preprocessor.transform(frame))
    got = inference.predict_tensors(bundle.model, images, metadata)
    singles = [inference.predict_tensors(inference.build_inference_bundle(s, tta="flips").model, images, metadata)
               for s in (state, other)]
    np.testing.assert_allclose(got, np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)

    changed = dict(other, image_config={**state["image_config"], "image_size": 40})
    with pytest.raises(ValueError, match="run-b has a different image_config"):
        inference.ensemble_state([state, changed], sources=["run-a", "run-b"])


# -- the permutation arm -------------------------------------------------------------------------


def test_permuted_metadata_moves_whole_rows_and_keeps_identity(synthetic_dir):
    from skinml.steps.evaluate import permute_metadata

    frame = _frame(synthetic_dir, 30)
    permuted = permute_metadata(frame, seed=0)
    features = [c for c in schema.FEATURES if c in frame.columns]
    keep = [c for c in frame.columns if c not in features]
    pd.testing.assert_frame_equal(permuted[keep], frame[keep])
    order = np.random.default_rng(0).permutation(len(frame))
    pd.testing.assert_frame_equal(permuted[features].reset_index(drop=True),
                                  frame[features].iloc[order].reset_index(drop=True))
    assert (order != np.arange(len(frame))).sum() > 20  # most rows got another patient's answers
    # the same answers overall: a neutral arm, not an imputed one
    for column in features:
        assert sorted(map(str, permuted[column].tolist())) == sorted(map(str, frame[column].tolist()))


def test_explaining_an_ensemble_averages_its_members_maps(tiny_training, tmp_path, synthetic_dir):
    from skinml.explain import explain
    from skinml.explain import image as image_attr

    state = inference.load_checkpoint(tiny_training.checkpoint)
    other = dict(state, model_state={k: v * 1.05 if v.is_floating_point() else v
                                     for k, v in state["model_state"].items()})
    bundle = inference.load_bundle(inference.save_checkpoint(inference.ensemble_state([state, other]),
                                                             tmp_path / "ensemble.pt"))
    photo = next(iter(sorted((synthetic_dir / "images").glob("*.png"))))
    result = explain(bundle, photo, {"age": 60}, n_permutations=4)
    x = prepare_image(photo.read_bytes(), bundle.image_config)[None]
    from skinml.explain.core import clinical_frame

    m = torch.as_tensor(bundle.preprocessor.transform(clinical_frame(bundle, {"age": 60})))
    target = schema.LABELS.index(result.target)
    grids = np.mean([image_attr.gradcam(member, x, m, target) for member in bundle.model.members], axis=0)
    np.testing.assert_allclose(result.heatmap, grids / grids.max(), atol=1e-6)
    assert "mean over the 2 ensemble members" in result.method
    total = sum(c.contribution for c in result.metadata_contributions)
    assert total == pytest.approx(result.probabilities[result.target] - result.baseline_probability, abs=1e-4)


def tracking_download(run_id: str) -> str:
    from skinml import tracking

    return tracking.download_artifact(run_id, inference.BEST)


def test_ensemble_run_is_scored_registered_and_served_as_the_mean(mlflow_store, synthetic_dir):
    import mlflow

    from skinml.steps.ensemble import TAG_ENSEMBLE_OF, build_ensemble
    from skinml.steps.evaluate import evaluate_run
    from skinml.steps.register import register_run
    from skinml.steps.train import train
    from tests.test_training import tiny

    # the default's view (training scale + centre crop): served probabilities equal evaluation's
    first = train(tiny(epochs=1, eval_view="crop"), data_dir=str(synthetic_dir), seed=0, num_workers=0)
    split = mlflow.MlflowClient().get_run(first.run_id).data.params["split_run_id"]
    second = train(tiny(epochs=1, eval_view="crop"), data_dir=str(synthetic_dir), split=split, seed=1, num_workers=0)
    result = build_ensemble([first.run_id, second.run_id], data_dir=str(synthetic_dir))
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags[TAG_ENSEMBLE_OF] == f"{first.run_id},{second.run_id}"
    assert run.data.tags["skinml.step"] == "train" and run.data.params["seed"] == "ensemble:0,1"
    assert 0 <= run.data.metrics["best_val_bacc"] <= 1 and run.data.metrics["ensemble_size"] == 2

    # its test predictions are the mean of its members'
    preds = [evaluate_run(r, n_boot=0, explanations=False).predictions for r in (first.run_id, second.run_id)]
    ens = evaluate_run(result.run_id, n_boot=0, explanations=False).predictions
    cols = [f"p_{label}" for label in schema.LABELS]
    np.testing.assert_allclose(ens[cols].to_numpy(), (preds[0][cols].to_numpy() + preds[1][cols].to_numpy()) / 2,
                               atol=1e-5)

    # registered and loaded as one pyfunc version: the same probabilities
    info = register_run(result.run_id, force=True)
    served = mlflow.pyfunc.load_model(info["model_uri"])
    from skinml.data.source import load_metadata
    from tests.test_serving import b64, clinical_records

    rows = load_metadata(synthetic_dir).set_index(schema.IMAGE_ID).loc[ens[schema.IMAGE_ID][:4]].reset_index()
    request = pd.DataFrame([{"image": b64(Path(p).read_bytes()), **fields}
                            for p, fields in zip(rows["image_path"], clinical_records(rows))])
    out = served.predict(request)
    np.testing.assert_allclose(out[list(schema.LABELS)].to_numpy(dtype=float), ens[cols].to_numpy()[:4], atol=1e-4)

    # scored the other way: the checkpoint keeps the view, so evaluation and serving follow it
    squash = build_ensemble([first.run_id, second.run_id], data_dir=str(synthetic_dir), view="squash")
    state = inference.load_checkpoint(tracking_download(squash.run_id))
    assert state["image_config"]["resize"] == 0 and mlflow.get_run(squash.run_id).data.tags["skinml.view"] == "squash"
    assert inference.load_checkpoint(tracking_download(result.run_id))["image_config"]["resize"] == 36

    with pytest.raises(ValueError, match="itself an ensemble"):
        build_ensemble([result.run_id, first.run_id], data_dir=str(synthetic_dir))
    other = train(tiny(epochs=1, eval_view="crop", label_smoothing=0.2), data_dir=str(synthetic_dir), split=split, seed=2,
                  num_workers=0)
    with pytest.raises(ValueError, match="recipe.label_smoothing"):
        build_ensemble([first.run_id, other.run_id], data_dir=str(synthetic_dir))


def test_fusion_widths_are_options_and_old_configs_keep_theirs():
    model = create_model("cnn_fusion", 9, backbone="test_efficientnet", pretrained="none", metadata_dim=32, head_dim=128)
    assert model.head[0].in_features == model.backbone.num_features + 32 and model.head[0].out_features == 128
    assert model.metadata_mlp.layers[0].out_features == 32
    assert (model.config["options"]["metadata_dim"], model.config["options"]["head_dim"]) == (32, 128)
    default = create_model("cnn_fusion", 9, backbone="test_efficientnet", pretrained="none")
    assert default.head[0].in_features == default.backbone.num_features + 64  # the original design
    with pytest.raises(ValueError, match="metadata_dim must be a whole number"):
        create_model("cnn_fusion", 9, backbone="test_efficientnet", pretrained="none", metadata_dim=0)


def test_default_preset_is_the_previous_default_with_mixup():
    from skinml.steps.train import recipe_overrides

    default, v2 = resolve_recipe("default"), resolve_recipe("default_v2")
    assert default.mixup_alpha == 0.2 and v2.mixup_alpha == 0.0
    assert {k for k, v in default.flat().items() if v2.flat()[k] != v} == {"preset", "mixup_alpha"}
    assert recipe_overrides(default) == recipe_overrides(v2) == []
    # the cross-validation runs were `--recipe default --set mixup_alpha=0.2` when default had no mixup
    assert resolve_recipe("default_v2", mixup_alpha="0.2").flat() == {**default.flat(), "preset": "default_v2"}


def test_default_v2_preset_is_the_recipe_chosen_on_validation():
    from skinml.steps.train import recipe_overrides

    v2, v1 = resolve_recipe("default_v2"), resolve_recipe("default_v1")
    assert (v2.metadata_encoding, v2.missing_indicators, v2.questionnaire_dropout,
            v2.eval_view, v2.augment_device) == ("onehot", True, 0.5, "squash", "batch")
    assert (v2.imbalance, v2.lr_backbone) == (v1.imbalance, v1.lr_backbone) == ("loss", 1e-4)
    # one geometry: training decodes the whole photo at the model's input size, no random crop
    assert v2.augment.resize == 0 and v2.train_decode_size == v2.image_size == 224
    assert resolve_recipe("default_v2", image_size=240).train_decode_size == 240  # larger backbones too
    assert recipe_overrides(v2) == []
    # the first candidate runs were trained as default_v1 plus these overrides (random 224 crops of
    # a 257-px decode); they selected their epoch on the crop view and were scored both ways
    candidate = resolve_recipe("default_v1", metadata_encoding="onehot", missing_indicators="true",
                               questionnaire_dropout="0.5", augment_device="batch", eval_view="crop")
    differ = {k for k, v in candidate.flat().items() if k != "preset" and v2.flat()[k] != v}
    assert differ == {"eval_view", "augment.resize"} and candidate.augment.resize == 257
    # the default before it (README, "Results": "(2) previous default", random crops) is one override away
    previous = resolve_recipe("default_v2", augment_resize=257)
    assert {k for k, v in previous.flat().items() if v2.flat()[k] != v} == {"augment.resize"}


def test_lite2_preset_is_the_default_on_lite2_at_its_native_size():
    from skinml.steps.train import recipe_overrides

    v2, lite2 = resolve_recipe("default_v2"), resolve_recipe("default_lite2")
    assert (lite2.backbone, lite2.image_size, lite2.train_decode_size) == ("efficientnet_lite2", 260, 260)
    assert {k for k, v in lite2.flat().items() if v2.flat()[k] != v} == {"preset", "backbone", "image_size"}
    assert recipe_overrides(lite2) == []
    # the validation runs were `--recipe default --backbone efficientnet_lite2 --set image_size=260`
    # when default was today's default_v2
    assert resolve_recipe("default_v2", backbone="efficientnet_lite2", image_size="260").flat() == \
        {**lite2.flat(), "preset": "default_v2"}


def test_lite2_224_preset_is_the_lite2_preset_at_lite0s_size():
    from skinml.steps.train import recipe_overrides

    v2, lite2, small = (resolve_recipe(name) for name in ("default_v2", "default_lite2", "default_lite2_224"))
    assert (small.backbone, small.image_size, small.train_decode_size) == ("efficientnet_lite2", 224, 224)
    assert {k for k, v in small.flat().items() if v2.flat()[k] != v} == {"preset", "backbone"}
    assert {k for k, v in small.flat().items() if lite2.flat()[k] != v} == {"preset", "image_size"}
    assert recipe_overrides(small) == []
    # the validation runs were `--recipe default_lite2 --set image_size=224`
    assert resolve_recipe("default_lite2", image_size="224").flat() == {**small.flat(), "preset": "default_lite2"}


def test_compare_keeps_an_ensemble_apart_from_its_members():
    from types import SimpleNamespace

    from skinml.steps.compare import model_label

    def run(tags):
        return SimpleNamespace(data=SimpleNamespace(tags={"skinml.model": "cnn_fusion", **tags}, params={}))

    assert model_label(run({})) == "cnn_fusion"
    assert model_label(run({"skinml.ensemble_of": "a,b,c", "skinml.tta": "none"})) == "cnn_fusion ensemble x3"
    assert model_label(run({"skinml.ensemble_of": "a", "skinml.tta": "flips"})) == "cnn_fusion +flips"
    assert model_label(run({"skinml.ensemble_of": "a,b", "skinml.tta": "flips"})) == "cnn_fusion ensemble x2 +flips"
