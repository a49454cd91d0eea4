"""Serving: the pyfunc model (models-from-code), its request schema and client helpers.

- :mod:`skinml.serving.pyfunc_model`: the ``mlflow.pyfunc.PythonModel`` MLflow loads and serves;
- :mod:`skinml.serving.schema`: signature, input example and request validation (pure);
- :mod:`skinml.serving.client`: build requests, score in-process or against ``mlflow models serve``.

Importing this package imports neither torch nor MLflow.
"""

from pathlib import Path

#: The models-from-code file passed to ``mlflow.pyfunc.log_model(python_model=...)``.
PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")

__all__ = ["PYFUNC_MODEL_FILE"]
