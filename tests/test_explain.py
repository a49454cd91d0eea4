"""Explanations mean something: sanity checks on data where the right answer is known.

- pointing game: the label is a coloured disc at a random, known position; Grad-CAM's peak
  must fall inside that disc (not on the grey distractor disc, not on the background);
- model randomisation (Adebayo et al., 2018): a re-initialised model gives a different map;
- metadata: where one clinical field alone decides the label, it ranks first;
- geometry and plumbing: overlays have the photo's size, the served explanation equals
  ``skinml explain``, the gallery writes its files.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from skinml.data import schema
from skinml.data.images import resize_to_array
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.transforms import ImageConfig, build_eval_transform, prepare_image, uint8_to_tensor
from skinml.explain import explain, field_groups, metadata_baseline, write_gallery
from skinml.explain.image import gradcam, receptive_field_offset
from skinml.explain.metadata import image_features_fixed
from skinml.explain.overlay import peak, resize_map
from skinml.inference import InferenceBundle
from skinml.models import create_model, create_model_from_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread keeps these tests from oversubscribing it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- pointing-game data: a class-coloured disc and a grey distractor on noisy skin -------------

PHOTO_W, PHOTO_H = 192, 128  # not square: the evaluation transform squashes it, the map must not
INPUT_SIZE = 128  # test_efficientnet (stride 32) -> a 4 x 4 feature grid
DISC_R, DISTRACTOR_R = 30, 18
DISC_COLOURS = {"ACK": (220, 40, 40), "BCC": (40, 60, 220), "MEL": (40, 170, 60)}


def disc_photo(rng: np.random.Generator, label: str) -> tuple[np.ndarray, float, float]:
    image = np.clip(np.array([224, 180, 150]) + rng.normal(0, 12, (PHOTO_H, PHOTO_W, 3)), 0, 255)
    while True:
        cx, cy = rng.uniform(DISC_R, PHOTO_W - DISC_R), rng.uniform(DISC_R, PHOTO_H - DISC_R)
        dx, dy = rng.uniform(DISTRACTOR_R, PHOTO_W - DISTRACTOR_R), rng.uniform(DISTRACTOR_R, PHOTO_H - DISTRACTOR_R)
        if np.hypot(cx - dx, cy - dy) > DISC_R + DISTRACTOR_R + 4:
            break
    yy, xx = np.mgrid[:PHOTO_H, :PHOTO_W]
    image[np.hypot(xx - dx, yy - dy) < DISTRACTOR_R] = (120, 120, 120)
    image[np.hypot(xx - cx, yy - cy) < DISC_R] = DISC_COLOURS[label]
    return image.astype(np.uint8), cx, cy


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def toy_preprocessor(**options) -> MetadataPreprocessor:
    return MetadataPreprocessor(**options).fit(pd.DataFrame({"age": [30.0, 60.0], "region": ["FACE", "BACK"]}))


@pytest.fixture(scope="module")
def disc_model():
    """cnn_fusion (test_efficientnet, random init) trained for 3 epochs to name the disc's colour;
    the clinical answers are noise. About 20-40 s on one shared core."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    labels = list(DISC_COLOURS)
    preprocessor = toy_preprocessor()
    model = create_model("cnn_fusion", preprocessor.n_features_out, backbone="test_efficientnet", pretrained="none")
    config = ImageConfig(image_size=INPUT_SIZE, mean=tuple(model.data_config["mean"]), std=tuple(model.data_config["std"]))
    to_input = build_eval_transform(config)

    train_y = rng.integers(0, len(labels), 192)
    train_x = torch.stack([to_input(uint8_to_tensor(resize_to_array(Image.fromarray(disc_photo(rng, labels[k])[0]),
                                                                     INPUT_SIZE))) for k in train_y])
    ages = pd.DataFrame({"age": rng.uniform(20, 80, len(train_y))})
    train_m = torch.from_numpy(preprocessor.transform(ages))
    targets = torch.as_tensor([schema.LABEL_TO_INDEX[labels[k]] for k in train_y])
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        model.train()
        order = torch.randperm(len(targets))
        for start in range(0, len(order), 32):
            batch = order[start:start + 32]
            loss = torch.nn.functional.cross_entropy(model(train_x[batch], train_m[batch]), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    bundle = InferenceBundle(model, preprocessor, config, list(schema.LABELS), "none (random init)")

    cases = []
    for k in rng.integers(0, len(labels), 40):
        photo, cx, cy = disc_photo(rng, labels[k])
        cases.append({"photo": png(photo), "label": labels[k], "cx": cx, "cy": cy,
                      "answers": {"age": float(rng.uniform(20, 80))}})
    return bundle, cases


def test_pointing_game_gradcam_peak_falls_inside_the_disc(disc_model):
    bundle, cases = disc_model
    hits, correct = 0, 0
    for case in cases:
        explanation = explain(bundle, case["photo"], case["answers"], target=case["label"])
        correct += explanation.label == case["label"]
        x, y = peak(explanation.heatmap, explanation.photo_size, explanation.input_size, explanation.map_offset)
        hits += np.hypot(x - case["cx"], y - case["cy"]) <= DISC_R
    assert correct / len(cases) >= 0.9, f"the disc model did not learn the task ({correct}/{len(cases)} right)"
    assert hits / len(cases) >= 0.8, f"Grad-CAM peak inside the disc for {hits}/{len(cases)} photos"


def test_receptive_field_offset_is_measured_not_assumed(disc_model):
    bundle, _ = disc_model
    dx, dy = receptive_field_offset(bundle.model, INPUT_SIZE)
    # Five stride-2 convolutions padded k // 2 centre cell j at 32 j (+ a fraction), half a cell
    # (16 px) up and left of its block's centre; the measurement must find about that.
    assert -24 < dx < -8 and -24 < dy < -8, (dx, dy)
    hot = np.zeros((4, 4))
    hot[1, 2] = 1.0
    assert peak(hot, (PHOTO_W, PHOTO_H)) == (2.5 * 48, 1.5 * 32)  # no geometry: block centres
    x, y = peak(hot, (PHOTO_W, PHOTO_H), INPUT_SIZE, (dx, dy))
    assert x == pytest.approx((80 + dx) * 1.5) and y == pytest.approx(48 + dy)
    full = resize_map(hot, (PHOTO_W, PHOTO_H), INPUT_SIZE, (dx, dy))
    assert full.shape == (PHOTO_H, PHOTO_W)
    row, col = np.unravel_index(np.argmax(full), full.shape)
    assert abs(col - x) <= 1.5 and abs(row - y) <= 1.5


def test_model_randomisation_changes_the_map(disc_model):
    """Adebayo et al. (2018): a map that survives re-initialising every weight explains the
    input or the architecture, not what the model learned."""
    from scipy.stats import spearmanr

    bundle, cases = disc_model
    torch.manual_seed(1)
    randomised = create_model_from_config(bundle.model.config).eval()
    config = bundle.image_config
    randomised_rho, control_rho = [], []
    for case in cases:
        image = prepare_image(case["photo"], config)[None]
        metadata = torch.from_numpy(bundle.preprocessor.transform(pd.DataFrame([case["answers"]])))
        target = schema.LABEL_TO_INDEX[case["label"]]
        trained = gradcam(bundle.model, image, metadata, target, relu=False).ravel()
        randomised_rho.append(spearmanr(trained, gradcam(randomised, image, metadata, target, relu=False).ravel())[0])
        noisy = image + 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(len(control_rho)))
        control_rho.append(spearmanr(trained, gradcam(bundle.model, noisy, metadata, target, relu=False).ravel())[0])
    randomised_mean = float(np.nanmean(randomised_rho))
    control_mean = float(np.nanmean(control_rho))
    # The statistic must be able to say "same map": the trained model on a slightly noisy copy.
    assert control_mean > 0.8, control_mean
    # Threshold 0.5: below it the re-initialised map keeps less than half of the trained map's
    # cell ranking. With 16 cells one rho has an SD of about 1/sqrt(15) = 0.26 under no relation,
    # so the mean of 40 is about +-0.04 around its expectation: 0.5 is far from both chance (0)
    # and from the control above. Measured here: about -0.2 (see the report).
    assert randomised_mean < 0.5, f"randomised model's map still correlates (mean Spearman {randomised_mean:.2f})"


def test_overlay_has_the_photo_size_and_scores_like_evaluation(disc_model, tmp_path):
    bundle, cases = disc_model
    photo = cases[0]["photo"]
    path = tmp_path / "photo.png"
    path.write_bytes(photo)
    from_path = explain(bundle, str(path), cases[0]["answers"])
    from_bytes = explain(bundle, photo, cases[0]["answers"])
    assert from_path.to_json() == from_bytes.to_json()
    assert Image.open(io.BytesIO(from_path.overlay_png)).size == (PHOTO_W, PHOTO_H) == from_path.photo_size
    assert from_path.heatmap.shape == (4, 4) and 0 <= from_path.heatmap.min() and from_path.heatmap.max() == 1
    image = prepare_image(photo, bundle.image_config)[None]
    metadata = torch.from_numpy(bundle.preprocessor.transform(pd.DataFrame([cases[0]["answers"]])))
    with torch.no_grad():
        expected = torch.softmax(bundle.model(image, metadata), dim=1)[0].numpy()
    np.testing.assert_allclose([from_path.probabilities[label] for label in schema.LABELS], expected, atol=1e-6)

    with pytest.raises(ValueError, match=r"unknown clinical field\(s\) \['bleeding'\]"):
        explain(bundle, photo, {"bleeding": "True"})
    with pytest.raises(ValueError, match="target 'XYZ' is not one of the model's labels"):
        explain(bundle, photo, {}, target="XYZ")


# -- metadata ------------------------------------------------------------------------------


def bleed_frame(n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Clinical rows where ``bleed`` alone decides the label (True -> BCC, False -> NEV); the
    other fields are noise. 30% bleed, so the baseline (most common answer) is False."""
    bleed = rng.random(n) < 0.3
    return pd.DataFrame({
        "age": rng.uniform(20, 90, n).round(),
        "region": rng.choice(["FACE", "BACK", "ARM", "CHEST"], n),
        "smoke": rng.choice(["True", "False"], n),
        "itch": rng.choice(["True", "False", "UNK"], n),
        "diameter_1": rng.uniform(2, 30, n).round(),
        "bleed": np.where(bleed, "True", "False"),
        schema.TARGET: np.where(bleed, "BCC", "NEV"),
    })


def test_the_field_that_decides_the_label_ranks_first():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = bleed_frame(320, rng)
    preprocessor = MetadataPreprocessor().fit(train)
    assert preprocessor.modes_["bleed"] == "False"
    model = create_model("cnn_fusion", preprocessor.n_features_out, backbone="test_efficientnet", pretrained="none")
    config = ImageConfig(image_size=32, mean=tuple(model.data_config["mean"]), std=tuple(model.data_config["std"]))
    # The photo says nothing: one skin-coloured photo for every row. The backbone stays in eval
    # mode so batch norm does not normalise a constant batch to zeros in training only.
    photo = png(np.full((32, 32, 3), (224, 180, 150), dtype=np.uint8))
    image = prepare_image(photo, config)
    x = torch.from_numpy(preprocessor.transform(train))
    y = torch.as_tensor(train[schema.TARGET].map(schema.LABEL_TO_INDEX).to_numpy().copy())
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(10):
        model.train()
        model.backbone.eval()
        order = torch.randperm(len(y))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(model(image.expand(len(batch), -1, -1, -1), x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    bundle = InferenceBundle(model.eval(), preprocessor, config, list(schema.LABELS), "none")

    test = bleed_frame(60, np.random.default_rng(1))
    bleeding = test[test["bleed"] == "True"].drop(columns=[schema.TARGET]).head(8)
    assert len(bleeding) >= 5
    for answers in bleeding.to_dict("records"):
        explanation = explain(bundle, photo, answers)
        assert explanation.label == "BCC"
        first = explanation.metadata_contributions[0]
        assert (first.field, first.value, first.towards) == ("bleed", "True", "BCC"), explanation.summary()
        assert first.contribution > 0.3
        assert first.text() == f"bleed: True  {first.contribution:+.2f} towards BCC"
        total = sum(c.contribution for c in explanation.metadata_contributions)
        assert total == pytest.approx(explanation.probabilities["BCC"] - explanation.baseline_probability, abs=1e-5)

    # A field at its baseline answer (or left blank, which the preprocessor imputes to it) adds 0.
    not_bleeding = explain(bundle, photo, {"bleed": "False", "age": 50})
    blank = explain(bundle, photo, {"age": 50})
    for explanation in (not_bleeding, blank):
        contributions = {c.field: c.contribution for c in explanation.metadata_contributions}
        assert contributions["bleed"] == 0.0
    assert {c.field: c.value for c in blank.metadata_contributions}["bleed"] is None
    assert "most common answer in the training split" in blank.baseline and "bleed=False" in blank.baseline


def test_fields_group_encoded_columns_and_baseline_turns_indicators_off():
    frame = pd.DataFrame({"age": [30.0, None, 50.0], "region": ["FACE", "BACK", "FACE"],
                          "bleed": ["True", None, "False"], "itch": ["UNK", "True", "True"]})
    preprocessor = MetadataPreprocessor(encoding="onehot", missing_indicators=True).fit(frame)
    groups = field_groups(preprocessor)
    names = preprocessor.get_feature_names_out()
    assert sorted(i for indices in groups.values() for i in indices) == list(range(len(names)))
    assert [names[i] for i in groups["bleed"]] == ["bleed=<unseen>", "bleed=False", "bleed=True", "bleed_missing"]
    assert [names[i] for i in groups["age"]] == ["age", "age_missing"]
    baseline = metadata_baseline(preprocessor)
    assert baseline.vector[names.index("age_missing")] == 0 and baseline.vector[names.index("bleed_missing")] == 0
    assert baseline.vector[names.index("region=FACE")] == 1 and baseline.values["region"] == "FACE"
    assert baseline.values["age"] == "40"


def test_image_features_fixed_equals_the_full_forward():
    preprocessor = toy_preprocessor()
    model = create_model("cnn_fusion", preprocessor.n_features_out, backbone="test_efficientnet",
                         pretrained="none").eval()
    image = torch.randn(1, 3, 64, 64)
    metadata = torch.randn(5, preprocessor.n_features_out)
    with torch.no_grad():
        full = model(image.expand(5, -1, -1, -1), metadata)
        with image_features_fixed(model, image):
            replayed = model(image.expand(5, -1, -1, -1), metadata)
        after = model(torch.randn(5, 3, 64, 64), metadata)
    torch.testing.assert_close(replayed, full)
    assert not torch.allclose(after, full)  # the replay is gone after the block
    assert "forward" not in vars(model.backbone)


def test_spatial_fusion_reports_its_attention_and_gradcam():
    preprocessor = toy_preprocessor()
    torch.manual_seed(0)
    model = create_model("spatial_fusion", preprocessor.n_features_out, cnn_backbone="test_efficientnet",
                         vit_backbone="test_vit", pretrained="none", img_size=64, proj_dim=32, num_heads=4).eval()
    config = ImageConfig(image_size=64, mean=tuple(model.data_config["mean"]), std=tuple(model.data_config["std"]))
    bundle = InferenceBundle(model, preprocessor, config, list(schema.LABELS), "none")
    photo = png(np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8))
    explanation = explain(bundle, photo, {"age": 40, "region": "BACK"})
    assert set(explanation.maps) == {"gradcam", "attention_cls", "attention_metadata"}
    assert all(grid.shape == (2, 2) for grid in explanation.maps.values())
    assert set(explanation.overlays) == set(explanation.maps)
    assert all(Image.open(io.BytesIO(data)).size == (80, 50) for data in explanation.overlays.values())
    assert "cross-attention" in explanation.method and "token_proj" in explanation.method
    document = json.loads(explanation.to_json())
    assert set(document["attention_overlays_png_base64"]) == {"attention_cls", "attention_metadata"}


# -- the gallery ---------------------------------------------------------------------------


def test_gallery_writes_pngs_and_one_self_contained_page(disc_model, tmp_path):
    bundle, cases = disc_model
    rows, images = [], []
    for i, case in enumerate(cases[:12]):
        path = tmp_path / "photos" / f"PAT_{i}_1_{i}.png"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(case["photo"])
        rows.append({schema.IMAGE_ID: path.name, schema.TARGET: case["label"], "age": case["answers"]["age"],
                     "image_path": str(path)})
        images.append(resize_to_array(Image.open(path).convert("RGB"), INPUT_SIZE))
    frame = pd.DataFrame(rows)
    images = np.stack(images)
    proba = np.stack([list(explain(bundle, c["photo"], c["answers"]).probabilities.values()) for c in cases[:12]])
    proba[0] = np.eye(len(schema.LABELS))[(schema.LABEL_TO_INDEX[cases[0]["label"]] + 1) % 6] * 0.9 + 0.1 / 6
    out = tmp_path / "explanations"
    written = write_gallery(bundle, frame, images, proba, out, max_side=96)

    present = sorted({case["label"] for case in cases[:12]})
    assert {p.name for p in written} == {*(f"class_{label}.png" for label in present), "gallery.html", "gallery.json"}
    for label in present:
        assert Image.open(out / f"class_{label}.png").size[0] > 0
    records = json.loads((out / "gallery.json").read_text())
    wrong = records[[r["img_id"] for r in records].index("PAT_0_1_0.png")]
    called = schema.LABELS[(schema.LABEL_TO_INDEX[cases[0]["label"]] + 1) % 6]
    assert (wrong["class"], wrong["kind"], wrong["predicted"], wrong["target"]) == (cases[0]["label"], "wrong",
                                                                                     called, called)
    assert all(r["kind"] in ("correct", "wrong") and r["metadata_contributions"] for r in records)
    page = (out / "gallery.html").read_text()
    assert page.count("data:image/png;base64,") == 2 * len(records)
    assert "src='http" not in page and "src=\"http" not in page
    assert "typical answered patient" in page
    thumbnail = page.split("data:image/png;base64,")[2].split("'")[0]
    assert Image.open(io.BytesIO(base64.b64decode(thumbnail))).size == (96, 64)  # aspect kept


# -- served model == skinml explain --------------------------------------------------------


def test_served_explanation_equals_the_cli(tiny_training, mlflow_store, synthetic_dir, tmp_path):
    import mlflow
    from click.testing import CliRunner
    from mlflow.exceptions import MlflowException

    from skinml import tracking
    from skinml.cli.explain import explain as explain_command
    from skinml.data.source import load_metadata
    from skinml.serving import client
    from skinml.steps import register as registry

    tags = {tracking.TAG_FAMILY: "fusion", tracking.TAG_MODEL: "cnn_fusion", tracking.TAG_RECIPE: "default",
            tracking.TAG_SPLIT_HASH: "ab" * 32}
    with tracking.start_run("train", run_name="tiny", tags=tags) as run:
        mlflow.log_params({"backbone": "test_efficientnet", "weights_source": "none (random init)",
                           "split_manifest_sha256": "ab" * 32})
        mlflow.log_metrics({"best_val_bacc": 0.5, "best_val_loss": 1.0, "best_epoch": 1})
        mlflow.log_artifact(tiny_training.checkpoint, "checkpoints")
    name = "explain-test"
    registry.register_run(run.info.run_id, name=name)
    uri = f"models:/{name}@champion"

    row = load_metadata(str(synthetic_dir)).iloc[3]
    answers = {c: row[c] for c in MetadataPreprocessor().input_columns if not schema.is_missing(row[c])}
    model = mlflow.pyfunc.load_model(uri)
    request = client.build_request([row["image_path"]], [answers])
    plain = model.predict(request)
    assert "explanation" not in plain.columns
    answer = model.predict(request, params={"explain": True})
    served = json.loads(answer.loc[0, "explanation"])
    assert served["label"] == answer.loc[0, "label"]
    assert {"overlay_png_base64", "metadata_contributions", "baseline", "method"} <= set(served)
    assert set(served["metadata_contributions"][0]) == {"field", "value", "contribution", "towards"}
    overlay = Image.open(io.BytesIO(base64.b64decode(served["overlay_png_base64"])))
    assert overlay.size == Image.open(row["image_path"]).size

    args = ["--image", row["image_path"]]
    for key, value in answers.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    for source in (["--model-uri", uri], ["--checkpoint", tiny_training.checkpoint]):
        out = tmp_path / source[0].strip("-")
        result = CliRunner().invoke(explain_command, [*args, *source, "--out", str(out)])
        assert result.exit_code == 0, result.output
        document = json.loads((out / "explanation.json").read_text())
        assert {k: v for k, v in document.items() if k not in ("model", "image", "answers")} == served, source
        assert (out / "overlay.png").read_bytes() == base64.b64decode(served["overlay_png_base64"])
        assert "towards" in result.output or "against" in result.output

    with pytest.raises(MlflowException, match="parameter 'explain' must be true or false"):
        model.unwrap_python_model().predict(None, request, params={"explain": "maybe"})
