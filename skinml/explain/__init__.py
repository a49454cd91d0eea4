"""Explanations: where in the photo the model looked and which clinical answers moved it.

- :func:`explain` -- one photo + clinical answers -> :class:`Explanation` (prediction,
  Grad-CAM heatmap and overlay on the original photo, per-field metadata contributions, the
  baseline they are measured from, the method);
- :func:`write_gallery` -- per class, the most confident correct and wrong cases of a scored
  split, as PNG grids and one self-contained HTML page.

Attributions come from Captum (Grad-CAM, Shapley value sampling); see :mod:`.image` and
:mod:`.metadata` for what each map and number means.
"""

from skinml.explain.core import Explanation, clinical_frame, explain, explain_prepared
from skinml.explain.gallery import select_cases, write_gallery
from skinml.explain.metadata import FieldContribution, field_groups, metadata_baseline

__all__ = [
    "Explanation",
    "FieldContribution",
    "clinical_frame",
    "explain",
    "explain_prepared",
    "field_groups",
    "metadata_baseline",
    "select_cases",
    "write_gallery",
]
