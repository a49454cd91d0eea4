"""The demo page's API (FastAPI TestClient), its thresholds, its knowledge base and retrieval.

The model is the session's tiny trained model (conftest ``tiny_training``) registered in a store
of this module's own; the photos and answers are real rows of the shared subset.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException
from PIL import Image

from skinml import tracking
from skinml.app import build_app, calibration_from_model, questionnaire
from skinml.app.backend import LocalPredictor, PredictionError, RemotePredictor, field_of, parse_explanation
from skinml.app.retrieval import (
    CONDITION_TERMS,
    KnowledgeError,
    KnowledgeIndex,
    load_knowledge,
    parse_knowledge_file,
)
from skinml.app.server import create_app, interpret
from skinml.app.thresholds import (
    AppConfig,
    CalibrationError,
    calibrate,
    choose_referral_threshold,
    choose_uncertainty_thresholds,
    is_uncertain,
    malignant_score,
    normalised_entropy,
    referral_performance,
)
from skinml.data import schema
from skinml.data.source import load_metadata
from skinml.serving import client as serving_client
from skinml.steps import register as registry

MODEL_NAME = "app-test-classifier"
PROBABILITY_COLUMNS = [f"p_{label}" for label in schema.LABELS]


# -- fixtures -----------------------------------------------------------------------------


def _log_training_run(checkpoint: str) -> str:
    tags = {tracking.TAG_FAMILY: "fusion", tracking.TAG_MODEL: "cnn_fusion", tracking.TAG_RECIPE: "default",
            tracking.TAG_SPLIT_HASH: "cd" * 32}
    with tracking.start_run("train", run_name="app-test", tags=tags) as run:
        mlflow.log_params({"backbone": "test_efficientnet", "weights_source": "none (random init)",
                           "split_manifest_sha256": "cd" * 32})
        mlflow.log_metrics({"best_val_bacc": 0.5, "best_val_loss": 1.0, "best_epoch": 1})
        mlflow.log_artifact(checkpoint, "checkpoints")
    return run.info.run_id


@pytest.fixture(scope="module")
def registered(tiny_training, tmp_path_factory):
    """The tiny model registered as champion in a store of this module; loaded once."""
    home = tmp_path_factory.mktemp("app-store")
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINML_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        tracking.setup_tracking()
        run_id = _log_training_run(tiny_training.checkpoint)
        result = registry.register_run(run_id, name=MODEL_NAME)
        uri = f"models:/{MODEL_NAME}@champion"
        model = mlflow.pyfunc.load_model(uri)
        yield SimpleNamespace(model=model, uri=uri, run_id=run_id, version=result["version"], home=home)
        while mlflow.active_run():
            mlflow.end_run()
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def predictor(registered):
    return LocalPredictor(registered.uri, model=registered.model)


@pytest.fixture(scope="module")
def app_client(predictor):
    with TestClient(create_app(predictor, AppConfig())) as client:
        yield client


@pytest.fixture(scope="module")
def real_rows(shared_subset) -> pd.DataFrame:
    """Real rows with every questionnaire field present (one BCC with bleeding among them)."""
    frame = load_metadata(shared_subset)
    complete = frame.dropna(subset=list(schema.QUESTIONNAIRE_FEATURES))
    return complete.head(4)


def answers_of(row: pd.Series, fields: list[str]) -> dict[str, str]:
    return {c: str(row[c]) for c in fields if not schema.is_missing(row[c])}


def pyfunc_answer(model, photo: bytes, answers: dict, top_k: int = 3) -> pd.Series:
    request = serving_client.build_request([photo], [answers])
    return model.predict(request, params={"top_k": top_k}).iloc[0]


def png_bytes(width: int, height: int, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else np.full((height, width, 3), 180,
                                                                                             np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -- /api/schema --------------------------------------------------------------------------


def test_schema_is_the_dataset_questionnaire_without_biopsed(app_client, predictor):
    body = app_client.get("/api/schema").json()
    names = [f["name"] for f in body["fields"]]
    assert "biopsed" not in names
    assert sorted(names) == sorted(c for c in predictor.input_fields if c != "biopsed")
    by_name = {f["name"]: f for f in body["fields"]}
    assert all(f["required"] is False for f in body["fields"])
    for column, values in schema.VOCABULARIES.items():
        if column in by_name:
            assert [c["value"] for c in by_name[column]["choices"]] == list(values)
    assert by_name["age"]["unit"] == "years" and by_name["diameter_1"]["unit"] == "mm"
    assert (by_name["age"]["minimum"], by_name["age"]["maximum"]) == schema.NUMERIC_RANGES["age"]
    assert [label["label"] for label in body["labels"]] == list(schema.LABELS)
    assert "not a medical device" in body["notice"]
    assert body["no_generated_text"].startswith("No text is generated")


def test_questionnaire_never_asks_biopsed_even_if_the_model_reads_it():
    form = questionnaire.questionnaire([*schema.FEATURES])  # a model trained with include_biopsed
    assert "biopsed" not in [f["name"] for f in form["fields"]]


def test_health_and_pages(app_client, registered):
    health = app_client.get("/api/health").json()
    assert health == {"status": "ok", "mode": "in-process", "model": registered.uri, "explain": True,
                      "calibrated": False}
    page = app_client.get("/")
    assert page.status_code == 200 and "not a medical device" in page.text and "No text is generated" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    # Offline: nothing is loaded from another host.
    for name in ("/", "/api", "/static/app.js", "/static/app.css", "/static/api.js"):
        text = app_client.get(name).text
        assert "http://" not in text.replace("http://127.0.0.1", "") and "cdn" not in text.lower(), name
    assert "innerHTML" not in app_client.get("/static/app.js").text.replace("never innerHTML", "")
    assert app_client.get("/static/../server.py").status_code == 404
    assert "/api/predict" in app_client.get("/openapi.json").json()["paths"]


# -- /api/predict -------------------------------------------------------------------------


def test_real_photo_scores_like_the_pyfunc(app_client, registered, predictor, real_rows):
    fields = predictor.input_fields
    for _, row in real_rows.iterrows():
        photo = Path(row["image_path"]).read_bytes()
        answers = answers_of(row, fields)
        expected = pyfunc_answer(registered.model, photo, answers)
        got = app_client.post("/api/predict", files={"image": ("lesion.jpg", photo, "image/jpeg")}, data=answers)
        assert got.status_code == 200, got.text
        body = got.json()
        for label in schema.LABELS:
            assert body["probabilities"][label] == pytest.approx(float(expected[label]), abs=1e-9)
        assert [t["label"] for t in body["top"]] == list(expected["top_labels"])
        assert [t["probability"] for t in body["top"]] == pytest.approx(list(expected["top_probabilities"]), abs=1e-9)
        assert body["top"][0]["name"] == schema.LABEL_NAMES[body["label"]]
        assert body["warnings"] == list(expected["warnings"])
        assert body["imputed_fields"] == [c for c in fields if c not in answers]
        # The same photo as JSON (base64) gets the same answer.
        as_json = app_client.post("/api/predict", json={"image": base64.b64encode(photo).decode(), "fields": answers})
        assert as_json.json()["probabilities"] == body["probabilities"]


def test_answer_shapes_notes_uncertainty_and_referral(app_client, real_rows):
    photo = Path(real_rows.iloc[0]["image_path"]).read_bytes()
    body = app_client.post("/api/predict", files={"image": ("a.jpg", photo, "image/jpeg")},
                           data={"age": "71", "region": "NOSE", "bleed": "True"}).json()
    assert body["answered_fields"] == ["age", "bleed", "region"]
    assert "age" not in body["imputed_fields"] and "smoke" in body["imputed_fields"]
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    assert body["referral"]["refer"] is None  # uncalibrated app: no advice, said so
    assert "app-calibrate" in body["referral"]["message"]
    assert body["uncertainty"]["uncertain"] == (body["probability"] < 0.5)
    assert body["notes"] and all(note["citations"] for note in body["notes"])
    assert body["notes"][0]["condition"] == body["label"]
    explanation = body["explanation"]  # the served model's {"explain": true} answer, checked
    assert base64.b64decode(explanation["overlay_png_base64"])[:8] == b"\x89PNG\r\n\x1a\n"
    contributions = explanation["metadata_contributions"]
    assert contributions and {c["field"] for c in contributions} <= set(body["answered_fields"]) | set(
        body["imputed_fields"])
    assert "heatmaps" not in explanation  # raw grids stay on the server
    assert "not a medical device" in body["notice"]


BAD_INPUTS = {
    # name: (multipart files, form fields, field the error names)
    "age not a number": ("photo", {"age": "abc"}, "age"),
    "negative age": ("photo", {"age": "-4"}, "age"),
    "negative diameter": ("photo", {"diameter_2": "-0.5"}, "diameter_2"),
    "markup as age": ("photo", {"age": "<img src=x onerror=alert(1)>"}, "age"),
    "not an image": ("text", {"age": "50"}, "image"),
    "no photo": (None, {"age": "50"}, "image"),
    "top_k out of range": ("photo", {"top_k": "9"}, "top_k"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_get_the_serving_400(app_client, registered, real_rows, case):
    kind, fields, field = BAD_INPUTS[case]
    photo = Path(real_rows.iloc[0]["image_path"]).read_bytes()
    content = {"photo": photo, "text": b"hello, not a photo", None: None}[kind]
    files = {"image": ("x.jpg", content, "image/jpeg")} if content is not None else None
    response = app_client.post("/api/predict", files=files, data=fields)  # no files: a urlencoded form
    # What `mlflow models serve` would answer: the pyfunc's own MlflowException message.
    answers = {k: v for k, v in fields.items() if k != "top_k"}
    frame = pd.DataFrame([{"image": base64.b64encode(content).decode() if content else None, **answers}])
    with pytest.raises(MlflowException) as served:
        registered.model.predict(frame, params={"top_k": int(fields.get("top_k", 3))})
    assert response.status_code == 400, response.text
    # An unreadable photo's message quotes a BytesIO object, whose address differs per call.
    without_address = re.compile(r" at 0x[0-9a-f]+")
    body = response.json()
    assert without_address.sub("", body["error"]) == without_address.sub("", served.value.message)
    assert body["field"] == field


def test_requests_the_app_refuses_itself(app_client, real_rows):
    photo = Path(real_rows.iloc[0]["image_path"]).read_bytes()
    files = {"image": ("x.jpg", photo, "image/jpeg")}
    misspelt = app_client.post("/api/predict", files=files, data={"agee": "50"})
    assert misspelt.status_code == 400 and misspelt.json()["field"] == "agee"
    assert "not a question of this model" in misspelt.json()["error"]
    proxy = app_client.post("/api/predict", files=files, data={"biopsed": "True"})
    assert proxy.status_code == 400 and proxy.json()["field"] == "biopsed"
    assert "label proxy" in proxy.json()["error"]
    wrong_type = app_client.post("/api/predict", content=b"image=abc", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415
    bad_json = app_client.post("/api/predict", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]


def test_body_size_limit(predictor, real_rows):
    photo = Path(real_rows.iloc[0]["image_path"]).read_bytes()
    with TestClient(create_app(predictor, AppConfig(), max_body_bytes=len(photo) // 2)) as small:
        declared = small.post("/api/predict", files={"image": ("x.jpg", photo, "image/jpeg")})
        assert declared.status_code == 413 and "above the limit" in declared.json()["error"]

        def chunks():  # no Content-Length: the limit applies while reading
            for start in range(0, len(photo), 4096):
                yield photo[start:start + 4096]

        streamed = small.post("/api/predict", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413


def test_photo_is_never_written_to_disk(app_client, tmp_path, monkeypatch):
    import tempfile

    spool = tmp_path / "tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    big = png_bytes(900, 900, noise=True)  # > 1 MiB: Starlette's form parser would spool it to a file
    assert len(big) > 2**20
    response = app_client.post("/api/predict", files={"image": ("big.png", big, "image/png")}, data={"age": "40"})
    assert response.status_code == 200, response.text
    assert list(spool.iterdir()) == []


def test_field_of_reads_both_message_styles():
    known = {"age", "image", "top_k", "diameter_2"}
    assert field_of("row 0, field 'age': must be a number", known) == "age"
    assert field_of("row 0: field 'image' is missing; send the photo", known) == "image"
    assert field_of("row 0: age must be a number, got 'abc'", known) == "age"
    assert field_of("row 1: diameter_2=-0.5 is out of range [0, 200]", known) == "diameter_2"
    assert field_of("parameter 'top_k' must be between 1 and 6, got 9", known) == "top_k"
    assert field_of("empty request: it has no rows", known) is None
    assert field_of("row 0: field 'nonsense' is odd", known) is None


# -- explanation --------------------------------------------------------------------------


class FakePredictor:
    """Answers like the served model with ``explain`` (another issue adds it to the pyfunc)."""

    mode, target, supports_explain = "in-process", "fake", True
    input_fields = list(questionnaire.questionnaire()["fields"][i]["name"] for i in range(3))

    def __init__(self, explanation):
        self.explanation = explanation
        self.calls = []

    def health(self):
        return {"status": "ok"}

    def predict(self, frame, top_k, explain):
        from skinml.app.backend import result_row

        self.calls.append({"explain": explain, "columns": list(frame.columns)})
        p = dict(zip(schema.LABELS, [0.05, 0.6, 0.05, 0.1, 0.15, 0.05]))
        return result_row({"label": "BCC", "label_name": schema.LABEL_NAMES["BCC"], "probability": 0.6, **p,
                           "top_labels": ["BCC", "SCC", "NEV"], "top_probabilities": [0.6, 0.15, 0.1],
                           "warnings": np.array(["row 0: imputed fields: smoke"]), "explanation": self.explanation})


def test_explanation_is_requested_checked_and_passed_on():
    overlay = base64.b64encode(png_bytes(8, 8)).decode()
    explanation = json.dumps({"overlay_png_base64": overlay, "method": "grad-cam", "baseline": "imputed",
                              "metadata_contributions": [{"field": "age", "value": "71", "contribution": 0.12,
                                                          "towards": "BCC"}], "extra": "<b>dropped</b>"})
    fake = FakePredictor(explanation)
    with TestClient(create_app(fake, AppConfig())) as client:
        body = client.post("/api/predict", json={"image": overlay, "fields": {"age": 71}}).json()
    assert fake.calls[0]["explain"] is True
    assert body["explanation"] == {"overlay_png_base64": overlay, "method": "grad-cam", "baseline": "imputed",
                                   "metadata_contributions": [{"field": "age", "value": "71", "contribution": 0.12,
                                                               "towards": "BCC"}]}
    assert body["warnings"] == ["row 0: imputed fields: smoke"]
    # Not a PNG, not JSON, or absent: no heatmap, and the answer still comes.
    assert parse_explanation(json.dumps({"overlay_png_base64": base64.b64encode(b"GIF89a...").decode()})) is None
    assert parse_explanation("{not json") is None
    assert parse_explanation(None) is None
    without = FakePredictor(None)
    with TestClient(create_app(without, AppConfig())) as client:
        body = client.post("/api/predict", json={"image": overlay, "fields": {}, "explain": False}).json()
    assert without.calls[0]["explain"] is False and body["explanation"] is None and body["top"]


# -- thresholds ---------------------------------------------------------------------------


def synthetic_predictions(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Predictions whose confidence tracks correctness, with patients of 1-3 images."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(schema.LABELS), size=n, p=[0.2, 0.3, 0.05, 0.2, 0.1, 0.15])
    logits = rng.normal(0, 1, (n, len(schema.LABELS)))
    logits[np.arange(n), y] += rng.uniform(0, 4, n)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    frame = pd.DataFrame(p, columns=PROBABILITY_COLUMNS)
    frame["true"] = [schema.LABELS[i] for i in y]
    frame["patient_id"] = [f"PAT_{i // 2}" for i in range(n)]
    return frame


def test_referral_threshold_is_the_highest_reaching_the_sensitivity():
    frame = synthetic_predictions()
    proba = frame[PROBABILITY_COLUMNS].to_numpy()
    score = malignant_score(proba)
    y = frame["true"].to_numpy()
    malignant = np.isin(y, ["BCC", "MEL", "SCC"])
    for target in (0.8, 0.9, 0.95, 1.0):
        t = choose_referral_threshold(score, y, target)
        assert (score[malignant] >= t).mean() >= target
        above = np.nextafter(t, 1.0)
        assert (score[malignant] >= above).mean() < target  # any higher cut misses the target
    assert malignant_score({"ACK": 0.1, "BCC": 0.2, "MEL": 0.3, "NEV": 0.1, "SCC": 0.25, "SEK": 0.05}) == \
        pytest.approx(0.75)
    with pytest.raises(CalibrationError, match="no malignant"):
        choose_referral_threshold(np.array([0.1, 0.2]), ["NEV", "SEK"])


def test_referral_performance_counts_and_patient_intervals():
    score = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.6, 0.4])
    y = ["BCC", "MEL", "SCC", "NEV", "SEK", "ACK", "NEV", "BCC"]
    groups = ["a", "a", "b", "c", "c", "d", "e", "f"]
    result = referral_performance(score, y, threshold=0.5, groups=groups, n_boot=200)
    assert result["sensitivity"]["estimate"] == pytest.approx(2 / 4)  # 0.9, 0.8 flagged; 0.3, 0.4 missed
    assert result["specificity"]["estimate"] == pytest.approx(2 / 4)  # 0.2, 0.1 kept; 0.7, 0.6 flagged
    assert result["n_malignant"] == 4 and result["n_patients"] == 6
    for metric in ("sensitivity", "specificity"):
        assert 0 <= result[metric]["low"] <= result[metric]["estimate"] <= result[metric]["high"] <= 1
    assert referral_performance(score, y, 0.5, groups, n_boot=200) == result  # seeded


def test_uncertainty_thresholds_reach_the_target_accuracy():
    frame = synthetic_predictions(600, seed=1)
    proba = frame[PROBABILITY_COLUMNS].to_numpy()
    y = frame["true"].to_numpy()
    chosen = choose_uncertainty_thresholds(proba, y, target_accuracy=0.8, min_confident=20)
    correct = proba.argmax(1) == np.array([schema.LABEL_TO_INDEX[v] for v in y])
    top, entropy = proba.max(1), normalised_entropy(proba)
    assert correct[top >= chosen["top_probability"]].mean() >= 0.8
    assert correct[entropy <= chosen["entropy"]].mean() >= 0.8
    # Loosest: one more row below the cut would drop the confident accuracy under the target,
    # or there is no looser cut at all.
    looser = top[top < chosen["top_probability"]]
    if looser.size:
        assert correct[top >= looser.max()].mean() < 0.8
    unsure = is_uncertain(top, entropy, chosen["top_probability"], chosen["entropy"])
    assert chosen["validation"]["flagged_fraction"] == pytest.approx(unsure.mean())
    assert chosen["validation"]["accuracy_confident"] > chosen["validation"]["accuracy_flagged"]
    impossible = choose_uncertainty_thresholds(proba, y, target_accuracy=1.0, min_confident=len(y))
    assert impossible["top_probability"] is None and is_uncertain(0.99, 0.0, None, None)


def test_calibrate_writes_a_config_the_app_uses(tmp_path):
    val, test = synthetic_predictions(400, 2), synthetic_predictions(300, 3)
    val.to_csv(tmp_path / "val.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    config = calibrate(tmp_path / "val.csv", tmp_path / "test.csv", target_sensitivity=0.95, n_boot=100)
    assert config.calibrated and 0 < config.referral_threshold < 1
    assert config.calibration["referral_validation"]["sensitivity"]["estimate"] >= 0.95
    assert config.calibration["referral_test"]["resampled"] == "patients"
    loaded = AppConfig.load(config.save(tmp_path / "app.json"))
    assert loaded == config
    row = {label: p for label, p in zip(schema.LABELS, [0.0, 0.5, 0.2, 0.3, 0.0, 0.0])}
    advice = interpret(row, loaded)
    assert advice["referral"]["refer"] == (0.7 >= loaded.referral_threshold)
    refer = interpret(row, AppConfig(referral_threshold=0.6, calibrated=True))["referral"]
    assert refer["refer"] is True and refer["message"].startswith("See a dermatologist soon")
    assert interpret(row, AppConfig(referral_threshold=0.75))["referral"]["refer"] is False
    with pytest.raises(CalibrationError, match="missing column"):
        calibrate(val.drop(columns=["p_MEL"]))
    with pytest.raises(CalibrationError, match="referral_threshold"):
        AppConfig.from_dict({"referral_threshold": 1.5})


def test_app_calibrate_cli_and_thresholds_from_the_model_run(registered, tmp_path):
    from skinml.cli.app import app as app_command
    from skinml.cli.app import app_calibrate

    val, test = synthetic_predictions(300, 4), synthetic_predictions(200, 5)
    val.to_csv(tmp_path / "val.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    result = CliRunner().invoke(app_calibrate, ["--val", str(tmp_path / "val.csv"), "--test",
                                      str(tmp_path / "test.csv"), "--out", str(tmp_path / "app.json"),
                                      "--n-boot", "50"])
    assert result.exit_code == 0, result.output
    assert "test: sensitivity" in result.output
    assert AppConfig.load(tmp_path / "app.json").calibrated
    both = CliRunner().invoke(app_command, ["--model-uri", "models:/x@champion", "--model-url", "http://127.0.0.1:1"])
    assert both.exit_code != 0 and "not both" in both.output

    # With evaluation/val predictions logged to the model's training run, the app calibrates itself.
    assert calibration_from_model(registered.uri) is None
    client = mlflow.tracking.MlflowClient()
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "predictions.csv").write_bytes((tmp_path / "val.csv").read_bytes())
    client.log_artifact(registered.run_id, str(staged / "predictions.csv"), "evaluation/val")
    config = calibration_from_model(registered.uri, n_boot=50)
    assert config is not None and config.calibrated and registered.run_id in config.calibration["source"]
    app = build_app(registered.uri, model=registered.model)
    with TestClient(app) as tc:
        assert tc.get("/api/schema").json()["decision"]["referral_threshold"] == config.referral_threshold


# -- remote: forwarding to MLflow's own scoring server ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scoring_server(registered):
    """MLflow's scoring server app (what `mlflow models serve` runs) on a loopback port."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(scoring_server.init(registered.model), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "scoring server did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_model_url_forwards_to_the_scoring_server(scoring_server, registered, predictor, real_rows):
    remote = RemotePredictor(scoring_server)
    assert remote.health() == {"status": "ok"}
    row = real_rows.iloc[1]
    photo = Path(row["image_path"]).read_bytes()
    answers = answers_of(row, predictor.input_fields)
    with TestClient(create_app(remote, AppConfig())) as client:
        body = client.post("/api/predict", files={"image": ("x.jpg", photo, "image/jpeg")}, data=answers).json()
        expected = pyfunc_answer(registered.model, photo, answers)
        for label in schema.LABELS:
            assert body["probabilities"][label] == pytest.approx(float(expected[label]), abs=1e-6)
        bad = client.post("/api/predict", files={"image": ("x.jpg", photo, "image/jpeg")}, data={"age": "abc"})
        with pytest.raises(MlflowException) as served:
            registered.model.predict(serving_client.build_request([photo], [{"age": "abc"}]))
        assert bad.status_code == 400 and bad.json() == {"error": served.value.message, "field": "age"}
    with pytest.raises(PredictionError, match="cannot reach"):
        RemotePredictor(f"http://127.0.0.1:{_free_port()}").predict(pd.DataFrame([{"image": "x"}]), 3, False)


# -- knowledge base and retrieval ---------------------------------------------------------


def test_every_passage_cites_a_listed_source_with_url_and_licence():
    passages = load_knowledge()
    assert {p.condition for p in passages} == set(schema.LABELS)
    for passage in passages:
        assert passage.file == f"knowledge/{passage.condition}.md"
        assert len(passage.citations) >= 1, passage.title
        for source in passage.citations:
            assert source.url.startswith("https://") and source.licence and source.publisher and source.title


@pytest.mark.parametrize("label", schema.LABELS)
def test_top_passage_for_a_condition_is_from_its_file(label):
    index = KnowledgeIndex()
    passage, _ = index.search(CONDITION_TERMS[label], k=1)[0]  # over the whole knowledge base
    assert passage.condition == label and passage.file == f"knowledge/{label}.md"
    notes = index.notes_for({label: 0.9, **{other: 0.02 for other in schema.LABELS if other != label}})
    assert notes[0]["condition"] == label and all(note["citations"] for note in notes)


def test_answers_steer_retrieval_within_a_condition():
    index = KnowledgeIndex()
    bleeding = index.notes_for({"BCC": 0.9}, {"bleed": "True", "region": "NOSE", "age": 70})
    assert any("bleed" in note["text"].lower() for note in bleeding)
    itching = index.notes_for({"SEK": 0.9}, {"itch": True})
    assert any("itch" in note["text"].lower() for note in itching)
    plain = index.notes_for({"SEK": 0.9}, {})
    assert [n["title"] for n in plain] != [n["title"] for n in itching]
    two = index.notes_for({"MEL": 0.5, "NEV": 0.4, "SEK": 0.1})
    assert [n["condition"] for n in two] == ["MEL", "MEL", "NEV"]


def test_knowledge_format_errors_name_the_file_and_passage():
    sources = "## Sources\n\n- [a] Title | Publisher | https://example.org/a | CC BY 4.0\n"
    ok = parse_knowledge_file("# X\n\n## One\n\nSome text.\n\nSources: [a]\n\n" + sources, "BCC", "k/BCC.md")
    assert ok[0].title == "One" and ok[0].citations[0].url == "https://example.org/a"
    with pytest.raises(KnowledgeError, match=r"k/BCC.md: passage 'One' cites no source"):
        parse_knowledge_file("## One\n\nSome text.\n\n" + sources, "BCC", "k/BCC.md")
    with pytest.raises(KnowledgeError, match=r"passage 'One' cites \['b'\]"):
        parse_knowledge_file("## One\n\nText.\n\nSources: [b]\n\n" + sources, "BCC", "k/BCC.md")
    with pytest.raises(KnowledgeError, match="needs 'title | publisher | URL | licence'"):
        parse_knowledge_file("## One\n\nText.\n\nSources: [a]\n\n## Sources\n\n- [a] Only a title\n", "BCC", "f")
