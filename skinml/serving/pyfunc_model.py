"""The served skin-lesion classifier, logged as MLflow models-from-code.

MLflow runs this file when the model is loaded (``mlflow.pyfunc.load_model`` or ``mlflow
models serve``); ``skinml`` itself travels with the model as ``code_paths``, so loading works
from any directory and runs the code the model was registered with. Artifacts (see
:func:`skinml.steps.register.log_pyfunc_model`):

- ``checkpoint``: the training run's ``checkpoints/best.pt`` (weights and model config);
- ``preprocessor``: the fitted metadata preprocessor (JSON, fitted on the training split);
- ``labels``: the label order of the outputs (JSON);
- ``image_config``: the evaluation transform's settings (JSON).

``model_config`` holds the serving limits (``max_pixels``, ``max_image_bytes``, ``max_rows``, ``min_side``);
``mlflow.pyfunc.load_model(uri, model_config={...})`` overrides them.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

log = logging.getLogger("skinml.serving")

#: Rows per forward pass; the result does not depend on it (eval mode, no batch statistics).
FORWARD_BATCH = 32


def torch_threads() -> int:
    """Intra-op threads: ``$SKINML_TORCH_THREADS``, else the cores shared among server workers."""
    explicit = os.environ.get("SKINML_TORCH_THREADS")
    if explicit:
        return max(1, int(explicit))
    workers = max(1, int(os.environ.get("MLFLOW_MODELS_WORKERS", "1") or 1))
    return max(1, (os.cpu_count() or 1) // workers)


class RequestRejected(MlflowException):
    """A request the model refuses: HTTP 400 (``INVALID_PARAMETER_VALUE``) with our message.

    MLflow's scoring server rewrites the message of any ``MlflowException`` from ``predict`` to
    ``Failed to predict data '<the whole request as a DataFrame>'. Error: <message>``
    (``mlflow.pyfunc.scoring_server.invocations``, 3.17), which buries the row and field after
    the request's dump. This message keeps what it was first given: the answer's ``message``
    starts with ``row N, field 'X':``.
    """

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if getattr(self, "_message", None) is None:  # set once, by __init__; later rewrites are dropped
            self._message = value


class SkinLesionClassifier(PythonModel):
    """Photo (base64 PNG/JPEG) + raw clinical fields -> diagnosis probabilities.

    See :mod:`skinml.serving.schema` for the request and response columns.
    """

    # -- one thread for all torch work ----------------------------------------------------------
    # The scoring server calls predict from a pool of threads (asyncio.to_thread). Torch's
    # OpenMP pool then exists once per calling thread, and with more OpenMP threads than cores
    # libgomp stops spinning between parallel regions: a Lite0 forward pass took 97-108 ms called
    # from to_thread against 34-41 ms when the model is built and run on one thread of its own
    # (python -m skinml.benchmarks.torch_thread; README, "Serving latency"). So loading, decoding, the forward pass and explanations all
    # run on a single dedicated thread; concurrent requests queue for it, as they would for the
    # cores anyway.

    def on_torch_thread(self, function, *args):
        executor = getattr(self, "_torch_thread", None)
        if executor is None:
            return function(*args)
        return executor.submit(function, *args).result()  # exceptions re-raised here, unchanged

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_torch_thread", None)  # a thread pool does not pickle; load_context makes one
        return state

    def load_context(self, context) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._torch_thread = ThreadPoolExecutor(1, thread_name_prefix="skinml-torch")
        self.on_torch_thread(self._load_context, context)

    def _load_context(self, context) -> None:
        import torch

        from skinml import inference
        from skinml.data.preprocess import MetadataPreprocessor
        from skinml.data.transforms import ImageConfig
        from skinml.serving.schema import ServingLimits

        threads = torch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        artifacts = context.artifacts
        state = inference.load_checkpoint(artifacts["checkpoint"])
        # The JSON artifacts are what the model documents; they must agree with the weights.
        with open(artifacts["labels"]) as fh:
            labels = json.load(fh)
        if list(labels) != list(state["labels"]):
            raise MlflowException(f"labels artifact {labels} disagrees with the checkpoint's {state['labels']}")
        with open(artifacts["preprocessor"]) as fh:
            state["preprocessor"] = MetadataPreprocessor.from_dict(json.load(fh)).to_dict()
        with open(artifacts["image_config"]) as fh:
            image_config = json.load(fh)
        state["image_config"] = ImageConfig.from_dict(image_config).to_dict() if image_config else None

        self.bundle = inference.build_inference_bundle(state)
        self.bundle.model.eval()
        self.limits = ServingLimits.from_dict(context.model_config)
        log.info("loaded %s (%s weights) with %d torch threads; limits %s", inference.model_name(state),
                 self.bundle.weights_source, threads, self.limits.to_dict())

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.on_torch_thread(self._predict, model_input, params)

    def _predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None) -> pd.DataFrame:
        import torch

        from skinml import inference
        from skinml.serving.schema import (
            ALLOW_EXTRA_PARAM,
            RequestError,
            format_predictions,
            validate_flag,
            validate_request,
            validate_top_k,
        )

        bundle = self.bundle
        explain = explain_requested(params)  # a bad value is refused before any work
        try:
            top_k = validate_top_k((params or {}).get("top_k"), len(bundle.labels))
            allow_extra = validate_flag((params or {}).get(ALLOW_EXTRA_PARAM), ALLOW_EXTRA_PARAM)
            request = validate_request(model_input, bundle.preprocessor, bundle.image_config, self.limits,
                                       allow_extra=allow_extra,
                                       uses_metadata=getattr(bundle.model, "uses_metadata", True))
        except RequestError as exc:
            raise RequestRejected(str(exc)) from None
        for row_warnings in request.warnings:
            for message in row_warnings:
                log.warning(message)

        proba = inference.predict_tensors(bundle.model, request.images, torch.from_numpy(request.metadata),
                                          batch_size=FORWARD_BATCH)
        predictions = format_predictions(proba, bundle.labels, request.index, top_k, request.warnings)
        if explain:
            from skinml.serving.schema import EXPLANATION_COLUMN

            predictions[EXPLANATION_COLUMN] = self.explanations(model_input, request.index)
        return predictions

    # -- explanations: params {"explain": true} (off by default) ---------------------------------
    def explanations(self, model_input, index) -> list[str]:
        """Per row, the JSON of :func:`skinml.explain.explain` for the row's photo and clinical
        fields: the same call ``skinml explain`` makes, so both give the same answer."""
        from dataclasses import replace

        from skinml.data.images import ImageError
        from skinml.explain import explain
        from skinml.serving import schema

        bundle = self.bundle
        if bundle.image_config is not None:  # refuse and accept photos exactly as validation did
            bundle = replace(bundle, image_config=replace(bundle.image_config, max_pixels=self.limits.max_pixels))
        frame = schema._as_frame(model_input)
        if not frame.index.is_unique:  # as validate_request does, so rows line up with `index`
            frame = frame.reset_index(drop=True)
        out = []
        for row in index:
            photo = None
            if bundle.uses_images:
                photo = schema._decode_image_field(frame.at[row, schema.IMAGE_COLUMN], row, self.limits)
            # The same cleaning validate_request applies, then the library call `skinml explain` makes.
            clinical = schema.normalise_clinical(frame.loc[[row]], bundle.preprocessor)
            warnings = schema.unknown_value_warnings(clinical, bundle.preprocessor).get(row, [])
            try:
                explanation = explain(bundle, photo, clinical.iloc[0].to_dict(), warnings=warnings)
            except (ImageError, ValueError) as exc:  # validation passed, so this is not expected
                raise RequestRejected(f"row {row}: cannot explain: {exc}") from None
            out.append(explanation.to_json())
        return out


def explain_requested(params: dict[str, Any] | None) -> bool:
    """The ``explain`` parameter (true/false, absent is false); a bad value is a 400."""
    from skinml.serving.schema import EXPLAIN_PARAM, RequestError, validate_flag

    try:
        return validate_flag((params or {}).get(EXPLAIN_PARAM), EXPLAIN_PARAM)
    except RequestError as exc:
        raise RequestRejected(str(exc)) from None


mlflow.models.set_model(SkinLesionClassifier())
