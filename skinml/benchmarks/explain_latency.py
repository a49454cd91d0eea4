"""``python -m skinml.benchmarks.explain_latency [THREADS] [DATA_DIR]``: extra latency of params {"explain": true} for one photo, in-process (the served PythonModel)."""
import statistics
import sys
import time

import torch
from PIL import Image

from skinml.data import schema
from skinml.data.preprocess import MetadataPreprocessor
from skinml.data.source import load_metadata
from skinml.data.transforms import ImageConfig
from skinml.inference import InferenceBundle
from skinml.models import create_model
from skinml.serving import client
from skinml.serving.pyfunc_model import SkinLesionClassifier
from skinml.serving.schema import ServingLimits

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
frame = load_metadata(sys.argv[2] if len(sys.argv) > 2 else None)  # else $SKINML_DATA_DIR
pre = MetadataPreprocessor().fit(frame)
row = frame.iloc[0]
answers = {c: row[c] for c in pre.input_columns if not schema.is_missing(row[c])}
request = client.build_request([row["image_path"]], [answers])
print("photo", row["image_path"], Image.open(row["image_path"]).size, "threads", torch.get_num_threads())
for name, options, size in (("tiny test_efficientnet @64", dict(backbone="test_efficientnet", pretrained="none"), 64),
                            ("efficientnet_lite0 package @224", dict(backbone="efficientnet_lite0", pretrained="package"), 224)):
    model = create_model("cnn_fusion", pre.n_features_out, **options).eval()
    served = SkinLesionClassifier()
    served.bundle = InferenceBundle(model, pre, ImageConfig(image_size=size, mean=tuple(model.data_config["mean"]),
                                                           std=tuple(model.data_config["std"])), list(schema.LABELS), "x")
    served.limits = ServingLimits()
    times = {}
    for explain in (False, True):
        served.predict(None, request, params={"explain": explain})  # warm-up (and the cached receptive-field offset)
        runs = []
        for _ in range(10):
            start = time.perf_counter()
            served.predict(None, request, params={"explain": explain})
            runs.append(time.perf_counter() - start)
        times[explain] = statistics.median(runs)
    print(f"{name}: explain=false {times[False]*1000:.0f} ms, explain=true {times[True]*1000:.0f} ms, "
          f"extra {1000*(times[True]-times[False]):.0f} ms (median of 10)")
