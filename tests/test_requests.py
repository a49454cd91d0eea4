"""Request hardening: unknown columns, imputed-field warnings, messages that start with the row
and field, degenerate photos, MLflow's message rewriting, and a property test of validation.

Everything but the last test runs in-process on a tiny untrained model (no training, no
server); the last starts a real `mlflow models serve` (slow)."""

from __future__ import annotations

import json
import math
import re
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from skinml.data import schema
from skinml.data.image_config import ImageConfig
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.inference import InferenceBundle
from skinml.models import create_model
from skinml.serving.pyfunc_model import RequestRejected, SkinLesionClassifier
from skinml.serving.schema import (
    ALLOW_EXTRA_PARAM,
    MAX_ECHO,
    RequestError,
    ServingLimits,
    model_signature,
    request_columns,
    validate_request,
)
from skinml.steps import register as registry
from tests.test_serving import _stop, _wait_until_healthy, b64, log_training_run, start_server
from tests.test_serving import png_bytes as png

ROW_FIELD = re.compile(r"^row \S+, field '.*?': ")


@pytest.fixture(scope="module")
def metadata_frame(synthetic_dir) -> pd.DataFrame:
    return load_metadata(synthetic_dir)


@pytest.fixture(scope="module")
def preprocessor(metadata_frame) -> MetadataPreprocessor:
    return MetadataPreprocessor().fit(metadata_frame)


@pytest.fixture(scope="module")
def photo(metadata_frame) -> str:
    return b64(Path(metadata_frame["image_path"].iloc[0]).read_bytes())


@pytest.fixture(scope="module")
def classifier(preprocessor) -> SkinLesionClassifier:
    """The served PythonModel around an untrained tiny cnn_fusion: what `load_context` builds,
    without a registry (validation and the forward pass are the same code)."""
    import torch

    torch.manual_seed(0)
    model = create_model("cnn_fusion", preprocessor.n_features_out, backbone="test_efficientnet",
                         pretrained="none").eval()
    python_model = SkinLesionClassifier()
    python_model.bundle = InferenceBundle(model, preprocessor, ImageConfig(image_size=32), list(schema.LABELS),
                                          "none (random init)")
    python_model.limits = ServingLimits()
    return python_model


CONFIG = ImageConfig(image_size=32)


# -- unknown columns ----------------------------------------------------------------------


def test_misspelled_columns_are_refused_naming_the_closest_field(preprocessor, photo):
    request = pd.DataFrame([{"image": photo, "age": 50}, {"image": photo, "Age": 90, "fitzpatrick": "2.0"}])
    with pytest.raises(RequestError) as caught:
        validate_request(request, preprocessor, CONFIG)
    message = str(caught.value)
    assert message.startswith("row 1, field 'Age': not a field of this model (did you mean 'age'?)")
    assert "also unknown: 'fitzpatrick' (did you mean 'fitspatrick'?)" in message
    assert '{"allow_extra_columns": true}' in message
    assert (caught.value.row, caught.value.field) == (1, "Age")


@pytest.mark.parametrize("column, closest", [("imgae", "image"), ("diameter1", "diameter_1"), ("REGION", "region"),
                                             ("biopsed", None), ("patient_id", None)])
def test_every_unknown_column_is_refused(preprocessor, photo, column, closest):
    with pytest.raises(RequestError) as caught:
        validate_request(pd.DataFrame([{"image": photo, column: "x"}]), preprocessor, CONFIG)
    assert str(caught.value).startswith(f"row 0, field '{column}': not a field of this model")
    if closest:
        assert f"did you mean '{closest}'?" in str(caught.value)


def test_extra_columns_allowed_on_request_are_ignored_with_a_warning(preprocessor, photo):
    plain = validate_request(pd.DataFrame([{"image": photo, "age": 50}]), preprocessor, CONFIG)
    extra = validate_request(pd.DataFrame([{"image": photo, "age": 50, "Age": 90, "note": None}]), preprocessor,
                             CONFIG, allow_extra=True)
    np.testing.assert_array_equal(extra.metadata, plain.metadata)  # 'Age' did not become the age
    assert extra.warnings[0][:-1] == plain.warnings[0]
    assert extra.warnings[0][-1] == "row 0: field 'Age' is not a field of this model; ignored"  # 'note' was null


def test_duplicate_columns_are_refused(preprocessor, photo):
    request = pd.DataFrame([[photo, 50, 60]], columns=["image", "age", "age"])
    with pytest.raises(RequestError, match=r"^row 0, field 'age': given 2 times"):
        validate_request(request, preprocessor, CONFIG)


def test_signature_lists_no_input_columns_so_the_model_sees_them(preprocessor):
    signature = model_signature(preprocessor)
    assert signature.inputs is None
    assert {p.name: p.default for p in signature.params.params}[ALLOW_EXTRA_PARAM] is False
    assert request_columns(preprocessor) == ["image", *preprocessor.input_columns]


# -- imputed fields -----------------------------------------------------------------------


def test_every_imputed_clinical_field_is_listed_per_row(preprocessor, photo):
    columns = preprocessor.input_columns
    complete = {c: "UNK" if c in ("itch", "grew", "hurt", "changed", "bleed", "elevation") else None for c in columns}
    complete.update(age=55, diameter_1=5, diameter_2=4, region="BACK", gender="FEMALE", fitspatrick=2, smoke=False,
                    drink=False, background_father="BRAZIL", background_mother="BRAZIL", pesticide=False,
                    skin_cancer_history=False, cancer_history=False, has_piped_water=True, has_sewage_system=True)
    rows = [
        {"image": photo, **complete},
        {"image": photo, **complete, "age": None, "smoke": "", "region": "UNK"},  # UNK is no region: imputed
        {"image": photo},
    ]
    valid = validate_request(pd.DataFrame(rows), preprocessor, CONFIG)
    assert valid.warnings[0] == []  # UNK is a category of the symptom flags: nothing imputed
    assert valid.warnings[1] == ["row 1: 3 clinical field(s) missing, imputed from the training data: "
                                 "smoke, age, region"]
    assert valid.warnings[2] == [f"row 2: {len(columns)} clinical field(s) missing, imputed from the training "
                                 f"data: {', '.join(columns)}"]
    # Metadata-free models impute nothing that matters: no warning.
    assert validate_request(pd.DataFrame(rows), preprocessor, CONFIG, uses_metadata=False).warnings[2] == []


# -- messages -----------------------------------------------------------------------------


BAD = {
    "age not a number": ({"age": "abc"}, "age", "must be a number, got 'abc'"),
    "age out of range": ({"age": -4}, "age", "-4 is out of range [0, 120]"),
    "huge integer age": ({"age": 10**5000}, "age", "<integer of 16,610 bits> is out of range [0, 120]"),
    "boolean age": ({"age": True}, "age", "must be a number, got True"),
    "list as a category": ({"region": ["BACK"]}, "region",
                           "must be a single text, number or true/false value, got list ['BACK']"),
    "huge integer category": ({"fitspatrick": 10**30}, "fitspatrick", "is not a valid value"),
    "image not text": ({"image": 12345}, "image", "must be a base64 string, got int 12345"),
    "image missing": ({"image": None}, "image", "missing; send the photo"),
    "image too small": ({"image": b64(png(1, 1))}, "image",
                        "image 'row 0' is 1x1 pixels, below the minimum of 32 px on the short side"),
    "image too thin": ({"image": b64(png(31, 400))}, "image", "is 31x400 pixels, below the minimum of 32 px"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_messages_start_with_the_row_and_field(preprocessor, photo, case):
    fields, field, problem = BAD[case]
    request = pd.DataFrame([{"image": photo, **fields}])
    with pytest.raises(RequestError) as caught:
        validate_request(request, preprocessor, CONFIG)
    assert str(caught.value).startswith(f"row 0, field '{field}': ")
    assert problem in str(caught.value)
    assert (caught.value.row, caught.value.field) == (0, field)


@pytest.mark.parametrize("field", ["age", "image", "region", "Age" * 4000])
def test_long_values_are_not_echoed_in_full(preprocessor, photo, field):
    value = "x" * 10_000
    request = pd.DataFrame([{"image": photo, field: value}])
    try:
        valid = validate_request(request, preprocessor, CONFIG)
    except RequestError as exc:
        message = str(exc)
    else:  # an unknown category is scored with a warning, which echoes it too
        message = valid.warnings[0][0]
    assert "x" * (MAX_ECHO + 1) not in message and len(message) < 700
    if field in ("age", "region"):
        assert "x" * (MAX_ECHO - 1) + "..." in message.lower()  # repr's opening quote + 79 characters
    elif field != "image":  # a photo's bad base64 is never echoed
        assert f"field '{('Age' * 27)[:MAX_ECHO]}...'" in message


def test_rejection_keeps_its_message_when_the_scoring_server_rewrites_it(classifier, photo):
    with pytest.raises(MlflowException) as caught:
        classifier.predict(None, pd.DataFrame([{"image": photo, "age": "x" * 10_000}]))
    error = caught.value
    assert isinstance(error, RequestRejected) and error.get_http_status_code() == 400
    # What mlflow.pyfunc.scoring_server.invocations does to any MlflowException from predict:
    error.message = f"Failed to predict data '{'<dump>' * 1000}'. \nError: {error.message}"
    body = json.loads(error.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"].startswith("row 0, field 'age': must be a number, got 'xxx")
    assert len(body["message"]) < 200


def test_allow_extra_columns_parameter_reaches_validation(classifier, photo):
    request = pd.DataFrame([{"image": photo, "age": 40, "fitzpatrick": "2.0"}])
    with pytest.raises(RequestRejected, match=r"^row 0, field 'fitzpatrick': .*did you mean 'fitspatrick'"):
        classifier.predict(None, request)
    answer = classifier.predict(None, request, params={ALLOW_EXTRA_PARAM: True})
    plain = classifier.predict(None, request.drop(columns=["fitzpatrick"]))
    np.testing.assert_array_equal(answer[list(schema.LABELS)].to_numpy(), plain[list(schema.LABELS)].to_numpy())
    assert "row 0: field 'fitzpatrick' is not a field of this model; ignored" in answer["warnings"].iloc[0]
    assert any("imputed from the training data" in w and "fitspatrick" in w for w in answer["warnings"].iloc[0])
    with pytest.raises(RequestRejected, match="parameter 'allow_extra_columns' must be true or false"):
        classifier.predict(None, request, params={ALLOW_EXTRA_PARAM: "maybe"})


# -- property: any record is scored or refused with a row and field ------------------------


FIELD_NAMES = ["image", *MetadataPreprocessor().input_columns, "Age", "fitzpatrick", "imgae", "biopsed", "", "x" * 200]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=10**20, max_value=10**40),
    st.just(10**5000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["55", "UNK", "BACK", "True", "3.0", "", "  ", "x" * 10_000, "nan", "1e400"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def image_values(photo):
    return {"photo": photo, "tiny": b64(png(4, 4)), "not base64": "%%%", "not an image": b64(b"GIF89a, or not")}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(record=st.dictionaries(st.sampled_from(FIELD_NAMES), VALUES, max_size=8),
       image=st.sampled_from(["photo", "tiny", "not base64", "not an image", None]),
       allow_extra=st.booleans())
def test_any_record_is_scored_or_refused_naming_a_row_and_field(classifier, image_values, record, image,
                                                                allow_extra):
    if image is not None:
        record = {**record, "image": image_values[image]}
    try:
        answer = classifier.predict(None, pd.DataFrame([record]), params={ALLOW_EXTRA_PARAM: allow_extra})
    except RequestRejected as exc:  # the 400 the server sends
        assert ROW_FIELD.match(exc.message), exc.message
        assert len(exc.message) < 1000
        return
    probabilities = answer[list(schema.LABELS)].to_numpy()
    assert probabilities.shape == (1, len(schema.LABELS)) and np.isfinite(probabilities).all()
    assert math.isclose(probabilities.sum(), 1.0, abs_tol=1e-5)
    assert all(isinstance(w, str) and len(w) < 2000 for w in answer["warnings"].iloc[0])


# -- a real server ------------------------------------------------------------------------


def post(url: str, body: bytes, content_type: str | None = "application/json") -> tuple[int, str]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def registered(tiny_training, mlflow_store) -> str:
    """The tiny trained model (conftest's `tiny_training`) registered as champion; its name."""
    result = registry.register_run(log_training_run(tiny_training.checkpoint, 0.5), name="test-requests")
    assert result["alias_moved"]
    return result["name"]


@pytest.mark.slow
def test_mlflow_models_serve_refuses_unknown_columns_with_row_and_field_first(registered, tmp_path, photo):
    name = registered
    process, port, log_path = start_server(f"models:/{name}@champion", tmp_path)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        _wait_until_healthy(process, port, log_path)
        records = [{"image": photo, "Age": 90, "fitzpatrick": "2.0"}]
        status, text = post(url, json.dumps({"dataframe_records": records}).encode())
        answer = json.loads(text)
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert answer["message"].startswith("row 0, field 'Age': not a field of this model (did you mean 'age'?)")
        assert "'fitzpatrick' (did you mean 'fitspatrick'?)" in answer["message"]

        # The opt-out: scored, the unknown fields named in the warnings, age imputed and said so.
        body = {"dataframe_records": records, "params": {ALLOW_EXTRA_PARAM: True}}
        status, text = post(url, json.dumps(body).encode())
        assert status == 200, text
        warnings = json.loads(text)["predictions"][0]["warnings"]
        assert "row 0: field 'Age' is not a field of this model; ignored" in warnings
        assert any("imputed from the training data" in w and "age" in w.split(": ")[-1].split(", ") for w in warnings)

        # A 10,000-character bad value: the message starts with the row and field, and is short.
        status, text = post(url, json.dumps({"dataframe_records": [{"image": photo, "age": "9" * 10_000 + "x"}]})
                            .encode())
        message = json.loads(text)["message"]
        assert status == 400 and message.startswith("row 0, field 'age': must be a number, got '999")
        assert len(text) < 400

        # Other request formats reach the same validation.
        status, text = post(url, json.dumps({"inputs": {"image": [photo], "agee": [50]}}).encode())
        assert status == 400 and json.loads(text)["message"].startswith("row 0, field 'agee'"), text
        status, text = post(url, json.dumps({"instances": [{"image": photo, "age": 50}]}).encode())
        assert status == 200, text
        # text/csv was an unclear 400 ("Failed to get pandas types ...") with Any-typed columns.
        csv = f"image,age,region,fitspatrick\n{photo},55,BACK,2.0\n".encode()
        status, text = post(url, csv, "text/csv")
        assert status == 200, text
        csv_answer = json.loads(text)["predictions"][0]
        status, text = post(url, json.dumps({"dataframe_records": [
            {"image": photo, "age": 55, "region": "BACK", "fitspatrick": "2.0"}]}).encode())
        json_answer = json.loads(text)["predictions"][0]
        assert all(abs(csv_answer[k] - json_answer[k]) < 1e-6 for k in schema.LABELS)
        assert process.poll() is None
    finally:
        _stop(process)

