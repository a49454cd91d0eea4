"""The served model: request validation (pure), the pyfunc against evaluation, CLI, a real server."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from PIL import Image

from skinml import inference, tracking
from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.data.transforms import ImageConfig, prepare_image
from skinml.serving import client
from skinml.serving.schema import (
    RequestError,
    ServingLimits,
    format_predictions,
    input_example,
    model_signature,
    request_columns,
    validate_request,
    validate_top_k,
)
from skinml.steps import register as registry

TOLERANCE = 1e-5
PIXEL_LIMIT = 1_000_000  # small enough that a 1200x1000 photo is refused


# The tiny trained model comes from conftest.py's session fixture `tiny_training`.


def log_training_run(checkpoint: str, bacc: float, family: str = "fusion", model: str = "cnn_fusion") -> str:
    """A finished training run in the current store carrying ``checkpoint`` and ``best_val_bacc``."""
    tags = {tracking.TAG_FAMILY: family, tracking.TAG_MODEL: model, tracking.TAG_RECIPE: "default",
            tracking.TAG_SPLIT_HASH: "ab" * 32}
    with tracking.start_run("train", run_name=f"{model}-{bacc}", tags=tags) as run:
        mlflow.log_params({"backbone": "test_efficientnet", "weights_source": "none (random init)",
                           "split_manifest_sha256": "ab" * 32})
        mlflow.log_metrics({"best_val_bacc": bacc, "best_val_loss": 1.0, "best_epoch": 1})
        mlflow.log_artifact(checkpoint, "checkpoints")
    return run.info.run_id


@pytest.fixture
def served(tiny_training, mlflow_store):
    """The tiny model registered as champion of a fresh store; returns (name, checkpoint)."""
    name = "test-skin-classifier"
    run_id = log_training_run(tiny_training.checkpoint, 0.5)
    result = registry.register_run(run_id, name=name, pixel_limit=PIXEL_LIMIT)
    assert result["alias_moved"] and result["champion_version"] == result["version"]
    return name, tiny_training.checkpoint


# -- helpers ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(width: int, height: int, colour=(200, 150, 120)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def clinical_records(frame: pd.DataFrame) -> list[dict]:
    """Clinical fields of metadata rows as written in metadata.csv (missing ones left out)."""
    columns = list(MetadataPreprocessor().input_columns)
    return [{k: v for k, v in row.items() if not schema.is_missing(v)} for row in frame[columns].to_dict("records")]


def expected_probabilities(checkpoint: str, frame: pd.DataFrame) -> np.ndarray:
    """What `skinml evaluate` computes for these rows: its own scoring function, on a fresh
    image cache, so serving is compared with evaluation and not with a copy of itself."""
    bundle = inference.load_bundle(checkpoint)
    return inference.score_frame(bundle, frame.reset_index(drop=True), device="cpu")


@pytest.fixture(scope="module")
def metadata_frame(synthetic_dir) -> pd.DataFrame:
    return load_metadata(synthetic_dir)


@pytest.fixture(scope="module")
def fitted(metadata_frame):
    preprocessor = MetadataPreprocessor().fit(metadata_frame)
    return preprocessor, ImageConfig(image_size=32)


@pytest.fixture(scope="module")
def photo(metadata_frame) -> bytes:
    return Path(metadata_frame["image_path"].iloc[0]).read_bytes()


# -- request validation (pure: no model, no server) ---------------------------------------


def test_valid_request_encodes_like_evaluation(fitted, metadata_frame):
    preprocessor, config = fitted
    rows = metadata_frame.head(5)
    request = pd.DataFrame([{"image": b64(Path(p).read_bytes()), **fields}
                            for p, fields in zip(rows["image_path"], clinical_records(rows))])
    valid = validate_request(request, preprocessor, config)
    assert valid.images.shape == (5, 3, 32, 32)
    expected_images = torch.stack([prepare_image(p, config) for p in rows["image_path"]])
    assert torch.equal(valid.images, expected_images)
    np.testing.assert_array_equal(valid.metadata, preprocessor.transform(rows))
    # No unknown values; the only warnings name the fields each row leaves out (imputed).
    for row, fields, warnings in zip(range(5), clinical_records(rows), valid.warnings):
        left_out = [c for c in preprocessor.input_columns if c not in fields]
        assert warnings == ([f"row {row}: {len(left_out)} clinical field(s) missing, imputed from the training data: "
                             f"{', '.join(left_out)}"] if left_out else [])


def test_json_types_missing_fields_and_unk(fitted, photo):
    preprocessor, config = fitted
    as_text = {"age": "55", "fitspatrick": "3.0", "smoke": "False", "region": "BACK", "diameter_1": "6.0"}
    as_json = {"age": 55, "fitspatrick": 3, "smoke": False, "region": "back", "diameter_1": 6}
    request = pd.DataFrame([{"image": b64(photo), **as_text}, {"image": b64(photo), **as_json}])
    valid = validate_request(request, preprocessor, config)
    np.testing.assert_array_equal(valid.metadata[0], valid.metadata[1])

    # Absent, null and UNK (where UNK is not a category) are all imputed with training statistics.
    imputed = preprocessor.transform(pd.DataFrame(index=[0]))[0]
    only_image = validate_request(pd.DataFrame([{"image": b64(photo)}]), preprocessor, config)
    np.testing.assert_array_equal(only_image.metadata[0], imputed)
    nulls = validate_request(pd.DataFrame([{"image": b64(photo), "age": None, "smoke": np.nan, "region": ""}]),
                             preprocessor, config)
    np.testing.assert_array_equal(nulls.metadata[0], imputed)
    unk = validate_request(pd.DataFrame([{"image": b64(photo), "age": "UNK", "smoke": "UNK", "itch": "UNK"}]),
                           preprocessor, config)
    names = preprocessor.get_feature_names_out()
    expected = imputed.copy()
    expected[names.index("itch")] = preprocessor.vocabularies_["itch"].index("UNK") + 1  # a real category there
    np.testing.assert_array_equal(unk.metadata[0], expected)
    assert len(unk.warnings[0]) == 1 and "itch" not in unk.warnings[0][0].split(": ")[-1].split(", ")  # UNK is an itch
    assert {"age", "smoke"} <= set(unk.warnings[0][0].split(": ")[-1].split(", "))  # value; elsewhere imputed


def test_clinical_table_and_frame_forms_agree(fitted):
    # The request path reads a ColumnTable; the CLI and explanations read normalise_clinical's
    # DataFrame: same values (UNK -> None where UNK is not a category), same warnings.
    from skinml.serving import schema as serving_schema

    preprocessor, _ = fitted
    request = pd.DataFrame([{"age": "UNK", "smoke": " unk ", "itch": "UNK", "region": "ELBOW", "diameter_1": 4},
                            {"age": 61, "smoke": None, "itch": "True", "region": "face", "diameter_1": np.nan}],
                           index=[10, 11])
    table = serving_schema.clinical_table(request, preprocessor)
    frame = serving_schema.normalise_clinical(request, preprocessor)
    assert table.index == [10, 11] and list(frame.index) == [10, 11]
    assert table["age"] == [None, 61] and table["smoke"][0] is None and table["itch"] == ["UNK", "True"]
    assert frame["age"].tolist() == [None, 61] and frame.at[11, "region"] == "face"
    assert list(frame.columns) == table.columns == [c for c in preprocessor.input_columns if c in request.columns]
    imputed = serving_schema.imputed_fields(table, preprocessor)
    assert imputed == serving_schema.imputed_fields(frame, preprocessor)
    assert {"age", "smoke", "gender"} <= set(imputed[10]) and "age" not in imputed[11] and "diameter_1" in imputed[11]
    warned = serving_schema.unknown_value_warnings(table, preprocessor)
    assert warned == serving_schema.unknown_value_warnings(frame, preprocessor) and list(warned) == [10]
    assert "region='ELBOW'" in warned[10][0]
    np.testing.assert_array_equal(preprocessor.transform(table), preprocessor.transform(frame))


def test_unknown_category_is_accepted_with_a_warning(fitted, photo):
    preprocessor, config = fitted
    request = pd.DataFrame([{"image": b64(photo), "region": "BACK"}, {"image": b64(photo), "region": "MARS"}])
    valid = validate_request(request, preprocessor, config)
    region = preprocessor.get_feature_names_out().index("region")
    assert valid.metadata[1, region] == 0.0  # code 0 = never seen in training
    assert valid.metadata[0, region] == preprocessor.vocabularies_["region"].index("BACK") + 1
    assert not any("region=" in w for w in valid.warnings[0])
    assert valid.warnings[1][0].startswith("row 1: region='MARS' is not a known value")
    assert not any("region=" in w for w in valid.warnings[1][1:])  # the rest: imputed fields


def test_base64_variants_decode_to_the_same_photo(fitted, photo):
    preprocessor, config = fitted
    text = b64(photo)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))  # as `base64` prints it
    variants = [text, wrapped, "data:image/png;base64," + text, base64.urlsafe_b64encode(photo).decode(), photo]
    valid = validate_request(pd.DataFrame({"image": variants}), preprocessor, config)
    for i in range(1, len(variants)):
        assert torch.equal(valid.images[i], valid.images[0])


BAD_REQUESTS = {
    "no image column": (lambda p: pd.DataFrame([{"age": 50}]), 0, "image",
                        "row 0, field 'image': missing: the request has no 'image' field"),
    "image missing in a row": (lambda p: pd.DataFrame({"image": [b64(p), None]}), 1, "image",
                               "row 1, field 'image': missing"),
    "invalid base64": (lambda p: pd.DataFrame({"image": ["not base64!!"]}), 0, "image",
                       "row 0, field 'image': not valid base64"),
    "invalid url-safe base64": (lambda p: pd.DataFrame({"image": [b64(p), "%%bad-base64_"]}), 1, "image",
                                "row 1, field 'image': not valid base64"),
    "not an image": (lambda p: pd.DataFrame({"image": [b64(b"hello world, not a PNG")]}), 0, "image",
                     "not a readable PNG/JPEG"),
    "image not a string": (lambda p: pd.DataFrame({"image": [12345]}), 0, "image",
                           "row 0, field 'image': must be a base64 string"),
    "too many pixels": (lambda p: pd.DataFrame({"image": [b64(p), b64(png_bytes(1200, 1000))]}), 1, "image",
                        "1200x1000 = 1,200,000 pixels, above the limit of 1,000,000"),
    "age not a number": (lambda p: pd.DataFrame([{"image": b64(p), "age": "abc"}]), 0, "age",
                         "row 0, field 'age': must be a number, got 'abc'"),
    "negative age": (lambda p: pd.DataFrame([{"image": b64(p), "age": -4}]), 0, "age",
                     "row 0, field 'age': -4 is out of range"),
    "negative diameter": (lambda p: pd.DataFrame({"image": [b64(p)] * 2, "diameter_2": [3.0, -0.5]}), 1,
                          "diameter_2", "row 1, field 'diameter_2': -0.5 is out of range"),
    "empty request": (lambda p: pd.DataFrame({"image": []}), None, None, "empty request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_name_the_row_and_field(fitted, photo, case):
    preprocessor, config = fitted
    make, row, field, message = BAD_REQUESTS[case]
    with pytest.raises(RequestError) as caught:
        validate_request(make(photo), preprocessor, config, ServingLimits(max_pixels=PIXEL_LIMIT))
    assert message in str(caught.value)
    assert (caught.value.row, caught.value.field) == (row, field)


def test_request_limits(fitted, photo):
    preprocessor, config = fitted
    with pytest.raises(RequestError, match="3 rows, above the limit of 2"):
        validate_request(pd.DataFrame({"image": [b64(photo)] * 3}), preprocessor, config, ServingLimits(max_rows=2))
    with pytest.raises(RequestError, match="row 0, field 'image': holds .* above the limit of 100"):
        validate_request(pd.DataFrame({"image": [b64(photo)]}), preprocessor, config,
                         ServingLimits(max_image_bytes=100))


def test_top_k_and_response_columns():
    assert [validate_top_k(v) for v in (None, 1, "2", 6.0)] == [3, 1, 2, 6]
    for bad in (0, 7, "x", 2.5, True):
        with pytest.raises(RequestError, match="top_k"):
            validate_top_k(bad)
    proba = np.array([[0.1, 0.5, 0.1, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.2, 0.3, 0.3]])
    out = format_predictions(proba, schema.LABELS, pd.Index([7, 8]), top_k=2, warnings=[["w"], []])
    assert list(out.index) == [7, 8]
    assert list(out.columns) == ["label", "label_name", "probability", *schema.LABELS, "top_labels",
                                 "top_probabilities", "warnings"]
    assert list(out["label"]) == ["BCC", "SCC"]  # ties go to the first label in label order
    assert out.loc[7, "label_name"] == "Basal cell carcinoma"
    assert out.loc[8, "top_labels"] == ["SCC", "SEK"] and out.loc[8, "top_probabilities"] == [0.3, 0.3]
    np.testing.assert_allclose(out[list(schema.LABELS)].to_numpy(), proba)
    assert out.loc[7, "probability"] == 0.5 and out.loc[7, "warnings"] == ["w"]


def test_signature_leaves_input_columns_to_the_model(fitted):
    preprocessor, _ = fitted
    signature = model_signature(preprocessor)
    # A named input schema would let MLflow drop misspelled columns before the model sees them.
    assert signature.inputs is None
    assert request_columns(preprocessor) == ["image", *preprocessor.input_columns]
    assert {p["name"]: p["default"] for p in signature.params.to_dict()} == {
        "top_k": 3, "explain": False, "allow_extra_columns": False}
    assert {s.name for s in signature.outputs.inputs} >= {"label", "probability", *schema.LABELS}
    example = input_example(preprocessor)
    assert list(example.columns)[0] == "image" and example.loc[0, "age"] == "55"
    assert validate_request(example, preprocessor, ImageConfig(image_size=32)).images.shape == (1, 3, 32, 32)


# -- the registered pyfunc model -----------------------------------------------------------


def test_registered_model_equals_evaluation_from_another_directory(served, metadata_frame, tmp_path, monkeypatch):
    name, checkpoint = served
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    rows = metadata_frame.head(12)
    request = client.build_request(list(rows["image_path"]), clinical_records(rows))
    answer = model.predict(request, params={"top_k": 2})

    expected = expected_probabilities(checkpoint, rows)
    got = answer[list(schema.LABELS)].to_numpy()
    assert np.abs(got - expected).max() < TOLERANCE
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-6)
    assert list(answer["label"]) == [schema.LABELS[i] for i in expected.argmax(axis=1)]
    np.testing.assert_allclose(answer["probability"], expected.max(axis=1), atol=TOLERANCE)
    assert all(len(labels) == 2 for labels in answer["top_labels"])
    assert not list(elsewhere.iterdir())  # nothing written to the working directory

    with pytest.raises(MlflowException) as caught:
        model.predict(request.assign(age=["abc"] + ["50"] * 11))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    assert caught.value.message.startswith("row 0, field 'age': must be a number, got 'abc'")


def test_cli_predict_and_score_in_process(served, metadata_frame, synthetic_dir, tmp_path):
    from skinml.cli import cli

    name, checkpoint = served
    runner = CliRunner()
    row = metadata_frame.iloc[[1]]
    fields = clinical_records(row)[0]
    args = ["predict", "--image", row["image_path"].iloc[0], "--name", name, "--json", "--top-k", "2"]
    for key, value in fields.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    expected = expected_probabilities(checkpoint, row)[0]
    assert np.abs(np.array([answer[label] for label in schema.LABELS]) - expected).max() < TOLERANCE
    assert answer["label"] == schema.LABELS[int(expected.argmax())] and len(answer["top_labels"]) == 2

    bad = runner.invoke(cli, ["predict", "--image", row["image_path"].iloc[0], "--name", name, "--age", "-3"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output
    assert "row 0, field 'age': '-3' is out of range [0, 120]" in bad.output

    out = tmp_path / "preds.csv"
    result = runner.invoke(cli, ["score", "--data-dir", str(synthetic_dir), "--out", str(out), "--name", name,
                                 "--batch-size", "64"])
    assert result.exit_code == 0, result.output
    assert f"scored {len(metadata_frame)} photos" in result.output and "balanced accuracy" in result.output
    table = pd.read_csv(out)
    assert list(table["img_id"]) == list(metadata_frame["img_id"])
    assert list(table["true_label"]) == list(metadata_frame["diagnostic"])
    expected = expected_probabilities(checkpoint, metadata_frame)
    assert np.abs(table[list(schema.LABELS)].to_numpy() - expected).max() < TOLERANCE
    assert list(table["label"]) == [schema.LABELS[i] for i in expected.argmax(axis=1)]


# -- a real `mlflow models serve` ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_healthy(process: subprocess.Popen, port: int, log_path: Path, timeout: float = 90.0) -> float:
    import urllib.request

    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow models serve was not healthy after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn workers: our group only
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


@pytest.mark.slow
def start_server(model_uri: str, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    """`mlflow models serve` of ``model_uri`` on a free loopback port, logging to ``workdir``."""
    port = _free_port()
    env = dict(os.environ)  # MLFLOW_TRACKING_URI points at the test store (mlflow_store)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # uvicorn of this venv
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return process, port, log_path


def test_mlflow_models_serve_end_to_end(served, metadata_frame, tmp_path, photo):
    name, checkpoint = served
    process, port, log_path = start_server(f"models:/{name}@champion", tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        startup = _wait_until_healthy(process, port, log_path)
        print(f"server healthy after {startup:.1f}s")
        # uvicorn runs with its compiled HTTP parser and event loop (the install brings httptools
        # and uvloop; without them it falls back to h11 and asyncio, slower per request)
        server = psutil.Process(process.pid)
        maps = "".join(Path(f"/proc/{p.pid}/maps").read_text() for p in [server, *server.children(recursive=True)])
        assert "httptools" in maps and "uvloop" in maps
        rows = metadata_frame.head(4)
        request = client.build_request(list(rows["image_path"]), clinical_records(rows))
        request.loc[request.index[3], "region"] = "MARS"
        expected_rows = rows.copy()
        expected_rows.loc[expected_rows.index[3], "region"] = "MARS"
        expected = expected_probabilities(checkpoint, expected_rows)
        for request_format in client.REQUEST_FORMATS:
            tick = time.perf_counter()
            answer = client.predict_remote(url, request, top_k=2, request_format=request_format)
            print(f"{request_format}: 4 rows in {time.perf_counter() - tick:.3f}s")
            assert np.abs(answer[list(schema.LABELS)].to_numpy() - expected).max() < TOLERANCE
            assert list(answer["label"]) == [schema.LABELS[i] for i in expected.argmax(axis=1)]
            assert [len(t) for t in answer["top_labels"]] == [2, 2, 2, 2]
            assert answer["warnings"].iloc[3][0] == (
                "row 3: region='MARS' is not a known value (expected one of "
                f"{', '.join(schema.REGIONS)}); scored as unknown")
            assert not any("is not a known value" in w for ws in answer["warnings"].iloc[:3] for w in ws)
            assert all("imputed from the training data" in w for ws in answer["warnings"] for w in ws
                       if "is not a known value" not in w)

        # The `inputs` form (columns of values) gives the same answer.
        first_row = {column: [client._json_value(request.iloc[0][column])] for column in request.columns}
        status, answer = client.post_json(f"{url}/invocations", {"inputs": first_row})
        assert status == 200, answer
        got = np.array([answer["predictions"][0][label] for label in schema.LABELS])
        assert np.abs(got - expected[0]).max() < TOLERANCE

        # The CLI against the server: one photo, then a whole folder.
        from skinml.cli import cli

        runner = CliRunner()
        first = metadata_frame.iloc[[0]]
        args = ["predict", "--image", first["image_path"].iloc[0], "--url", url, "--json"]
        for key, value in clinical_records(first)[0].items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, result.output
        answer = json.loads(result.output)
        assert np.abs(np.array([answer[label] for label in schema.LABELS]) - expected[0]).max() < TOLERANCE
        out = tmp_path / "remote.csv"
        result = runner.invoke(cli, ["score", "--data-dir", str(Path(metadata_frame.attrs["data_dir"])),
                                     "--out", str(out), "--url", url, "--batch-size", "50"])
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out)
        all_expected = expected_probabilities(checkpoint, metadata_frame)
        assert np.abs(table[list(schema.LABELS)].to_numpy() - all_expected).max() < TOLERANCE

        # benchmark-serving: each layer of a request timed on the same photos and model.
        from skinml.serving.benchmark import benchmark

        data_dir = str(Path(metadata_frame.attrs["data_dir"]))
        report = benchmark(url, data_dir, f"models:/{name}@champion", n_single=3, n_batch=1, batch_size=4, warmup=1)
        for size in ("single", "batch4"):
            bare = report[f"forward_{size}_median_ms"] + report[f"decode_{size}_median_ms"]
            # Every layer timed (no ordering asserted: the test machine may be busy).
            for layer in ("forward", "decode", "pyfunc", "handler", "http"):
                assert 0 < report[f"{layer}_{size}_median_ms"] <= report[f"{layer}_{size}_p95_ms"] < 60_000
            assert report[f"http_over_forward_decode_{size}"] == pytest.approx(
                report[f"http_{size}_median_ms"] / bare)
            assert report[f"mlflow_server_{size}_ms"] == pytest.approx(
                report[f"http_{size}_median_ms"] - report[f"pyfunc_{size}_median_ms"])
            assert report[f"mlflow_handler_{size}_ms"] + report[f"web_server_{size}_ms"] == pytest.approx(
                report[f"mlflow_server_{size}_ms"])
        assert report["batch_size"] == 4 and report["http_batch4_images_per_s"] == pytest.approx(
            4000 / report["http_batch4_median_ms"])
        # Timing another model than the one served would compare different things: refused.
        state = inference.load_checkpoint(checkpoint)
        state["model_state"]["head.3.bias"] = state["model_state"]["head.3.bias"] + torch.arange(len(schema.LABELS))
        other = inference.save_checkpoint(state, tmp_path / "other" / "best.pt")
        version = registry.register_run(log_training_run(str(other), 0.1), name=name, pixel_limit=PIXEL_LIMIT)
        with pytest.raises(RuntimeError, match=f"does not answer like models:/{name}/{version['version']}"):
            benchmark(url, data_dir, f"models:/{name}/{version['version']}", n_single=1, n_batch=0, batch_size=2)

        image = b64(photo)
        bad = {
            # The signature lists no input columns, so the model itself refuses a missing image.
            "missing image field": ({"dataframe_records": [{"age": 50}]},
                                    "row 0, field 'image': missing: the request has no 'image' field"),
            "null image": ({"dataframe_records": [{"image": image}, {"image": None, "age": 50}]},
                           "row 1, field 'image': missing"),
            "invalid base64": ({"dataframe_split": {"columns": ["image"], "data": [["%%%not base64"]]}},
                               "row 0, field 'image': not valid base64"),
            "not an image": ({"dataframe_records": [{"image": b64(b"GIF89a but not really")}]},
                             "row 0, field 'image': cannot decode image"),
            "too many pixels": ({"dataframe_records": [{"image": b64(png_bytes(1200, 1000))}]},
                                "row 0, field 'image': image 'row 0' is 1200x1000 = 1,200,000 pixels, above the "
                                "limit of 1,000,000"),
            "too small": ({"dataframe_records": [{"image": b64(png_bytes(1, 1))}]},
                          "row 0, field 'image': image 'row 0' is 1x1 pixels, below the minimum of 32 px"),
            "age not a number": ({"dataframe_records": [{"image": image, "age": "abc"}]},
                                 "row 0, field 'age': must be a number, got 'abc'"),
            "negative age": ({"dataframe_split": {"columns": ["image", "age"], "data": [[image, 40], [image, -2]]}},
                             "row 1, field 'age': -2 is out of range [0, 120]"),
            "negative diameter": ({"dataframe_records": [{"image": image, "diameter_1": -1.5}]},
                                  "row 0, field 'diameter_1': -1.5 is out of range [0, 200]"),
            "empty request": ({"dataframe_split": {"columns": ["image", "age"], "data": []}}, "empty request"),
            "empty records": ({"dataframe_records": []}, "empty request"),
            "bad top_k": ({"dataframe_records": [{"image": image}], "params": {"top_k": 9}},
                          "parameter 'top_k' must be between 1 and 6, got 9"),
        }
        for case, (body, message) in bad.items():
            status, answer = client.post_json(f"{url}/invocations", body)
            assert status == 400, (case, status, answer)
            assert isinstance(answer, dict) and answer["message"].startswith(message), (case, answer)

        refused = runner.invoke(cli, ["predict", "--image", first["image_path"].iloc[0], "--url", url, "--age", "abc"])
        assert refused.exit_code != 0 and "row 0, field 'age': must be a number, got 'abc'" in refused.output

        # The unknown value was also logged by the server.
        assert "region='MARS' is not a known value" in log_path.read_text()
        assert process.poll() is None  # no bad request took the server down
    finally:
        _stop(process)
    assert process.poll() is not None


def test_client_posts_without_nagle_delay(monkeypatch):
    """post_json (predict, score, the app, the benchmarks) opens connections with TCP_NODELAY, as
    curl and urllib3 do, and still delivers a photo-sized body whole."""
    import http.server
    import threading

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = json.dumps({"received": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    nodelay = []
    original = client._NoDelayHTTPConnection.connect

    def connect(self):
        original(self)
        nodelay.append(self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(client._NoDelayHTTPConnection, "connect", connect)
    try:
        body = {"image": "A" * 100_000}
        status, answer = client.post_json(f"http://127.0.0.1:{server.server_address[1]}/invocations", body)
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200 and answer == {"received": len(json.dumps(body))}
    assert nodelay and all(flag != 0 for flag in nodelay)


def test_benchmark_layers_take_turns_on_the_same_requests(monkeypatch):
    """Every layer times every request once, after its warm-up, the layers taking turns chunk by
    chunk; so when the machine slows down halfway, two layers doing the same work time alike
    (timed in one block each, the second would look twice as slow)."""
    from skinml.serving import benchmark as bench

    clock = {"now": 0.0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])
    calls = []

    def layer(name):
        def call(k):
            calls.append((name, k))
            clock["now"] += 2.0 if clock["now"] >= 8 else 1.0  # the machine halves its speed at t=8
        return call

    layers = {"a": layer("a"), "b": layer("b")}
    times = bench.time_layers(layers, list(range(8)), warmup=0, rounds=4)
    assert calls == [(name, k) for chunk in ((0, 1), (2, 3), (4, 5), (6, 7)) for name in "ab" for k in chunk]
    assert times == {"a": [1, 1, 1, 1, 2, 2, 2, 2], "b": [1, 1, 1, 1, 2, 2, 2, 2]}
    clock["now"], calls[:] = 0.0, []
    times = bench.time_layers(layers, list(range(8)), warmup=0, rounds=1)  # one block per layer
    assert times == {"a": [1] * 8, "b": [2] * 8}
    # warm-up calls come first and are not timed; uneven chunks; more rounds than requests
    clock["now"], calls[:] = 0.0, []
    times = bench.time_layers(layers, list(range(5)), warmup=2, rounds=2)
    assert calls == [("a", 0), ("a", 1), ("b", 0), ("b", 1),
                     ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 2), ("b", 3), ("b", 4)]
    assert [len(t) for t in times.values()] == [5, 5]
    calls[:] = []
    bench.time_layers(layers, [5, 6], warmup=0, rounds=9)
    assert calls == [("a", 5), ("b", 5), ("a", 6), ("b", 6)]


def test_benchmark_times_the_bare_layers_on_the_models_own_thread():
    """Models logged before and after the rename of the thread helper both get their layers run on
    the model's thread (another thread would add a second OpenMP pool and slow every layer); a
    model without one runs them on the caller's thread, like its predict."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from skinml.serving.benchmark import model_thread

    pool = ThreadPoolExecutor(1, thread_name_prefix="model-own")

    class Current:
        def on_torch_thread(self, function, *args):
            return pool.submit(function, *args).result()

    class Older:  # registered with the code of f844ec0..150e378
        def _on_torch_thread(self, function, *args):
            return pool.submit(function, *args).result()

    def where(x):
        return threading.current_thread().name, x

    try:
        for model in (Current(), Older()):
            name, value = model_thread(model)(where, 7)
            assert name.startswith("model-own") and value == 7
        assert model_thread(object())(where, 8) == (threading.current_thread().name, 8)
    finally:
        pool.shutdown()


def test_benchmark_encodes_clinical_fields_as_the_models_own_code_does(fitted, metadata_frame):
    """The decode layer encodes the clinical fields the way the model's request path does: from
    column lists with current code, from the DataFrame for a model registered before them."""
    import types

    from skinml.serving.benchmark import clinical_encoder

    preprocessor, _ = fitted
    rows = metadata_frame.head(4)
    seen = []

    class Recording:
        input_columns = preprocessor.input_columns

        def transform(self, frame):
            seen.append(type(frame).__name__)
            return preprocessor.transform(frame)

    older = types.ModuleType("older_skinml_preprocess")  # an old model's module: no ColumnTable
    Recording.__module__ = older.__name__
    sys.modules[older.__name__] = older
    try:
        np.testing.assert_array_equal(clinical_encoder(Recording())(rows), preprocessor.transform(rows))
        assert seen == ["DataFrame"]
    finally:
        del sys.modules[older.__name__]
    seen.clear()
    Recording.__module__ = type(preprocessor).__module__  # current code: column lists
    np.testing.assert_array_equal(clinical_encoder(Recording())(rows), preprocessor.transform(rows))
    assert seen == ["ColumnTable"]


def test_request_path_benchmark_times_real_requests(synthetic_dir, capsys):
    # The timed requests are the photos' rows as a client sends them: validated, they encode
    # exactly like the metadata rows they came from (no field lost or misread on the way).
    from skinml.benchmarks.request_path import main, one_photo_requests

    requests, rows, preprocessor = one_photo_requests(str(synthetic_dir), n=6)
    assert len(requests) == 6 and all(len(r) == 1 for r in requests)
    encoded = np.concatenate([validate_request(r, preprocessor, None).metadata for r in requests])
    np.testing.assert_array_equal(encoded, preprocessor.transform(rows))
    out = main(str(synthetic_dir), rounds=2, calls=3)
    assert set(out) == {"validate_request, clinical fields", "format_predictions"}
    assert all(len(times) == 2 for times in out.values())
    assert "median of 3 calls per round" in capsys.readouterr().out
