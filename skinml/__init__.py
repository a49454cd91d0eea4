"""skinml: multimodal skin-lesion classification on PAD-UFES-20, tracked with MLflow."""

__version__ = "0.1.0"
