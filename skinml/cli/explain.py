"""``skinml explain``: where the model looked and which clinical answers moved its prediction.

Heavy imports (torch, Captum, MLflow) happen inside the command so ``skinml --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from skinml.cli.common import empty_to_none, model_name_option
from skinml.cli.serving import _clinical_options, _serving_errors


def load_explainable_bundle(model_uri: str | None, checkpoint: str | None, name: str):
    """The :class:`~skinml.inference.InferenceBundle` of a checkpoint file, else of the
    registered pyfunc model (the very object the server scores with)."""
    if checkpoint:
        from skinml import inference

        return inference.load_bundle(checkpoint), f"checkpoint {checkpoint}"
    from skinml.serving import client

    uri = model_uri or client.model_uri_for(name)
    return client.load_model(uri).unwrap_python_model().bundle, uri


def served_clinical(bundle, answers: dict) -> dict:
    """The answers cleaned exactly as the served model cleans a request row (``UNK`` is
    "missing" where it is not a category), and the served model's unknown-value warnings."""
    import pandas as pd

    from skinml.serving.schema import normalise_clinical, unknown_value_warnings

    unknown = sorted(set(answers) - set(bundle.preprocessor.input_columns))
    if unknown:
        raise click.BadParameter(f"the model does not read {unknown}", param_hint="clinical options")
    clinical = normalise_clinical(pd.DataFrame([answers]), bundle.preprocessor)
    warnings = unknown_value_warnings(clinical, bundle.preprocessor).get(clinical.index[0], [])
    return {"metadata_row": clinical.iloc[0].to_dict(), "warnings": warnings}


@click.command("explain")
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Clinical photo (PNG or JPEG).")
@_clinical_options
@click.option("--model-uri", default=None, callback=empty_to_none,
              help="Registered model (default models:/<name>@champion).")
@click.option("--checkpoint", default=None, callback=empty_to_none, type=click.Path(exists=True, dir_okay=False),
              help="A training run's checkpoints/best.pt instead of a registered model.")
@model_name_option
@click.option("--target", default=None, callback=empty_to_none,
              help="Explain this class (ACK, BCC, MEL, NEV, SCC, SEK) instead of the predicted one.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for overlay.png (Grad-CAM on the photo, at its size) and explanation.json.")
@_serving_errors
def explain(image_path, model_uri, checkpoint, name, target, out_dir, **clinical):
    """Explain one prediction: Grad-CAM overlay on the photo and each clinical answer's contribution."""
    from skinml.explain import explain as explain_one

    if model_uri and checkpoint:
        raise click.UsageError("give --model-uri or --checkpoint, not both")
    bundle, source = load_explainable_bundle(model_uri, checkpoint, name)
    answers = {field: value for field, value in clinical.items() if value is not None}
    explanation = explain_one(bundle, image_path, target=target, **served_clinical(bundle, answers))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    document = {"model": source, "image": str(image_path), "answers": answers, **explanation.to_dict()}
    written = []
    for map_name, png in explanation.overlays.items():
        path = out / ("overlay.png" if map_name == "gradcam" else f"overlay_{map_name}.png")
        path.write_bytes(png)
        written.append(path)
    (out / "explanation.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    written.append(out / "explanation.json")

    click.echo(explanation.summary())
    click.echo(f"baseline: {explanation.baseline}")
    for message in explanation.warnings:
        click.echo(f"warning: {message}", err=True)
    click.echo("wrote " + ", ".join(str(p) for p in written))
