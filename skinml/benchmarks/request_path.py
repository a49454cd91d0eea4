"""Our part of a served request that is neither the photo nor the model: the clinical fields.

``python -m skinml.benchmarks.request_path DATA_DIR [ROUNDS]`` builds one-photo requests from the
first 50 photos of a PAD-UFES-20 folder exactly as ``skinml benchmark-serving`` sends them (the
DataFrame MLflow's server hands ``predict``), and times, single-threaded and without a model:

- ``validate_request`` with no image config: the columns check, the clinical values' checks, the
  encoding and the warnings (what validation adds to decoding the photo);
- ``format_predictions``: the answer's DataFrame.

Prints, per round, the median of 200 calls in ms. ``--code DIR`` times the ``skinml`` of another
checkout (e.g. ``git archive COMMIT | tar -x -C DIR``), to compare request paths on one machine.
"""

from __future__ import annotations

import statistics
import sys
import time


def one_photo_requests(data_dir: str, n: int = 50):
    """The first ``n`` photos' one-photo requests as MLflow's server hands them to ``predict``
    (DataFrames), their metadata rows, and a preprocessor with the default recipe's encoding
    (fitted on the whole folder: the statistics do not matter for timing).

    Built only from APIs older checkouts have too (``--code``), hence not shared with
    :func:`skinml.serving.benchmark.benchmark`, which builds the same requests.
    """
    import pandas as pd

    from skinml.data import schema
    from skinml.data.preprocess import MetadataPreprocessor
    from skinml.data.source import load_metadata
    from skinml.serving.client import build_request, request_body

    frame = load_metadata(data_dir).sort_values(schema.IMAGE_ID).reset_index(drop=True)
    preprocessor = MetadataPreprocessor(encoding="onehot", missing_indicators=True).fit(frame)
    rows = frame.head(n)
    requests = []
    for _, row in rows.iterrows():
        clinical = {c: row[c] for c in schema.FEATURES if c != "biopsed"}
        body = request_body(build_request([row["image_path"]], [clinical]))["dataframe_split"]
        requests.append(pd.DataFrame(body["data"], columns=body["columns"]))
    return requests, rows, preprocessor


def main(data_dir: str, rounds: int = 5, calls: int = 200) -> dict[str, list[float]]:
    import numpy as np
    import pandas as pd

    from skinml.data import schema
    from skinml.serving import schema as serving

    requests, _, preprocessor = one_photo_requests(data_dir)
    probabilities = np.full((1, len(schema.LABELS)), 1 / len(schema.LABELS))
    layers = {
        "validate_request, clinical fields": lambda request: serving.validate_request(request, preprocessor, None),
        "format_predictions": lambda request: serving.format_predictions(probabilities, schema.LABELS,
                                                                        pd.RangeIndex(1), 3, [[]]),
    }
    out: dict[str, list[float]] = {}
    for name, call in layers.items():
        for request in requests[:5]:
            call(request)
        out[name] = []
        for _ in range(rounds):
            times = []
            for k in range(calls):
                request = requests[k % len(requests)]
                tick = time.perf_counter()
                call(request)
                times.append(time.perf_counter() - tick)
            out[name].append(1000 * statistics.median(times))
        print(f"{name:36s} ms, median of {calls} calls per round: " + " ".join(f"{t:.2f}" for t in out[name]))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--code" in args:
        at = args.index("--code")
        sys.path.insert(0, args[at + 1])
        del args[at:at + 2]
    if not args:
        raise SystemExit(__doc__)
    import skinml

    print(f"skinml from {skinml.__file__}")
    main(args[0], *(int(a) for a in args[1:2]))
