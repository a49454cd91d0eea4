"""The served skin-lesion classifier, logged as MLflow models-from-code.

MLflow runs this file when the model is loaded (``mlflow.pyfunc.load_model`` or ``mlflow
models serve``); ``skinml`` itself travels with the model as ``code_paths``, so loading works
from any directory and runs the code the model was registered with. Artifacts (see
:func:`skinml.registry.log_pyfunc_model`):

- ``checkpoint``: the training run's ``checkpoints/best.pt`` (weights and model config);
- ``preprocessor``: the fitted metadata preprocessor (JSON, fitted on the training split);
- ``labels``: the label order of the outputs (JSON);
- ``image_config``: the evaluation transform's settings (JSON).

``model_config`` holds the serving limits (``max_pixels``, ``max_image_bytes``, ``max_rows``);
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


class SkinLesionClassifier(PythonModel):
    """Photo (base64 PNG/JPEG) + raw clinical fields -> diagnosis probabilities.

    See :mod:`skinml.serving.schema` for the request and response columns.
    """

    def load_context(self, context) -> None:
        import torch

        from skinml.data.preprocess import MetadataPreprocessor
        from skinml.data.transforms import ImageConfig
        from skinml.serving.schema import ServingLimits
        from skinml.training import checkpoints

        threads = torch_threads()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        artifacts = context.artifacts
        state = checkpoints.load(artifacts["checkpoint"])
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

        self.bundle = checkpoints.build_inference_bundle(state)
        self.bundle.model.eval()
        self.limits = ServingLimits.from_dict(context.model_config)
        log.info("loaded %s (%s weights) with %d torch threads; limits %s", state["model_config"]["name"],
                 self.bundle.weights_source, threads, self.limits.to_dict())

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import numpy as np
        import torch

        from skinml.serving.schema import RequestError, format_predictions, validate_request, validate_top_k

        bundle = self.bundle
        try:
            top_k = validate_top_k((params or {}).get("top_k"), len(bundle.labels))
            request = validate_request(model_input, bundle.preprocessor, bundle.image_config, self.limits)
        except RequestError as exc:
            # MLflow returns an invalid_parameter_value error as a 400 with this message.
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        for row_warnings in request.warnings:
            for message in row_warnings:
                log.warning(message)

        metadata = torch.from_numpy(request.metadata)
        probabilities = []
        with torch.inference_mode():
            for start in range(0, len(metadata), FORWARD_BATCH):
                chunk = metadata[start:start + FORWARD_BATCH]
                if request.images is not None:
                    images = request.images[start:start + FORWARD_BATCH].contiguous(memory_format=torch.channels_last)
                else:  # metadata-only models ignore the photo (a placeholder, as in LesionDataset)
                    images = torch.zeros(len(chunk), 3, 1, 1)
                logits = bundle.model(images, chunk).float()
                probabilities.append(torch.softmax(logits, dim=1).numpy())
        return format_predictions(np.concatenate(probabilities), bundle.labels, request.index, top_k, request.warnings)


mlflow.models.set_model(SkinLesionClassifier())
