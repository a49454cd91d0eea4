"""Data layer: source resolution, schema validation, image lookup, split, preprocessing."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from skinml.data import schema, source
from skinml.data.images import ImageError, decode_all, open_image
from skinml.data.preprocess import ColumnTable, MetadataError, MetadataPreprocessor
from skinml.data.split import attach_split, manifest_bytes, patient_level_split, split_summary
from skinml.data.synthetic import make_synthetic_dataset


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_metadata(folder, edit):
    path = folder / "metadata.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    edit(frame)
    frame.to_csv(path, index=False)


# -- source and schema ---------------------------------------------------------------------

def test_explicit_dir_beats_env(synthetic_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(source.DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert source.resolve_data_dir(synthetic_dir) == synthetic_dir.resolve()
    with pytest.raises(source.DatasetError, match="nowhere"):
        source.resolve_data_dir(None)


@pytest.mark.timeout(60)  # a hang on the network fails here; speed is not asserted in unit tests
def test_offline_kagglehub_fails_fast_with_hint(monkeypatch):
    monkeypatch.delenv(source.DATA_DIR_ENV, raising=False)
    with pytest.raises(source.DatasetUnavailableError) as err:
        source.resolve_data_dir(None)
    message = str(err.value)
    assert "SKINML_DATA_DIR" in message and "mahdavi1202/skin-cancer" in message and "data_dir" in message


def test_missing_columns_are_named(synthetic_dir, tmp_path):
    folder = _copy(synthetic_dir, tmp_path / "d")
    _rewrite_metadata(folder, lambda f: f.drop(columns=["fitspatrick", "region"], inplace=True))
    with pytest.raises(source.DatasetError, match="fitspatrick, region"):
        source.load_metadata(folder)


def test_bod_maps_to_scc_and_unknown_diagnosis_is_named(synthetic_dir, tmp_path):
    folder = _copy(synthetic_dir, tmp_path / "d")

    def to_bod(frame):
        frame.loc[0, "diagnostic"] = "BOD"

    _rewrite_metadata(folder, to_bod)
    frame = source.load_metadata(folder)
    assert frame.loc[0, "diagnostic"] == "SCC"
    assert set(frame["diagnostic"]) <= set(schema.LABELS)

    def to_unknown(f):
        f.loc[3, "diagnostic"] = "XYZ"

    _rewrite_metadata(folder, to_unknown)
    with pytest.raises(source.DatasetError) as err:
        source.load_metadata(folder)
    assert "XYZ" in str(err.value) and "[5]" in str(err.value)  # row 3 is line 5 of the file


def test_missing_images_error_or_counted_drop(synthetic_dir, tmp_path):
    folder = _copy(synthetic_dir, tmp_path / "d")
    frame = pd.read_csv(folder / "metadata.csv", dtype=str)
    gone = frame["img_id"].iloc[:3].tolist()
    for img in gone:
        (folder / "images" / img).unlink()
    with pytest.raises(source.DatasetError) as err:
        source.load_metadata(folder)
    assert "3 of" in str(err.value) and gone[0] in str(err.value)
    with pytest.warns(UserWarning, match="Dropped 3"):
        kept = source.load_metadata(folder, drop_missing_images=True)
    assert len(kept) == len(frame) - 3 and kept.attrs["dropped_missing_images"] == 3
    assert not set(gone) & set(kept["img_id"])


def test_images_found_by_stem_in_nested_folders(tmp_path):
    folder = make_synthetic_dataset(tmp_path / "k", n=24, image_size=16, nested=True)
    # Re-encode one image as JPEG: metadata still says .png, as in the shared subset.
    frame = pd.read_csv(folder / "metadata.csv", dtype=str)
    png = folder / "imgs_part_1" / "imgs_part_1" / frame["img_id"][0]
    open_image(png).save(png.with_suffix(".jpg"))
    png.unlink()
    loaded = source.load_metadata(folder)
    paths = dict(zip(loaded["img_id"], loaded["image_path"]))
    assert paths[frame["img_id"][0]].endswith(".jpg")
    assert all("imgs_part_1/imgs_part_1" in p for p in paths.values())


def test_corrupt_image_error_names_file(synthetic_dir, tmp_path):
    bad = tmp_path / "PAT_1_1_1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(ImageError, match="PAT_1_1_1.png"):
        open_image(bad)
    good = sorted((synthetic_dir / "images").glob("*.png"))[:2]
    with pytest.raises(ImageError, match="PAT_1_1_1.png"):
        decode_all([str(good[0]), str(bad), str(good[1])], size=16)


def test_decode_cache_roundtrip(synthetic_dir, tmp_path):
    paths = [str(p) for p in sorted((synthetic_dir / "images").glob("*.png"))[:20]]
    first = decode_all(paths, 24, cache_dir=tmp_path)
    assert first.shape == (20, 24, 24, 3) and first.dtype == np.uint8
    assert len(list(tmp_path.glob("*.npy"))) == 1
    again = decode_all(paths, 24, cache_dir=tmp_path)
    np.testing.assert_array_equal(first, again)


def test_canonical_categories():
    assert schema.canonical_category("smoke", True) == "True"
    assert schema.canonical_category("smoke", "false") == "False"
    assert schema.canonical_category("fitspatrick", 3) == "3.0"
    assert schema.canonical_category("background_father", "Brasil") == "BRAZIL"
    assert schema.canonical_category("region", float("nan")) is None
    assert schema.canonical_category("itch", "UNK") == "UNK"


# -- split ---------------------------------------------------------------------------------

def test_real_subset_split_by_patient(shared_subset):
    frame = source.load_metadata(shared_subset)
    assert len(frame) == 965
    for strategy in ("stratified", "random"):
        manifest = patient_level_split(frame, seed=42, strategy=strategy)
        assert manifest.groupby("patient_id")["split"].nunique().max() == 1
        shares = manifest["split"].value_counts(normalize=True)
        for name, target in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
            assert abs(shares[name] - target) <= 0.03, (strategy, name, shares[name])
    summary = split_summary(patient_level_split(frame, seed=42))
    # Stratified split puts MEL in every split, each close to its 15% share of 43 images.
    assert (summary.loc["MEL", ["train", "val", "test"]] >= 5).all()


def test_split_is_deterministic(synthetic_dir):
    frame = source.load_metadata(synthetic_dir)
    for strategy in ("stratified", "random"):
        a = manifest_bytes(patient_level_split(frame, seed=42, strategy=strategy))
        b = manifest_bytes(patient_level_split(frame, seed=42, strategy=strategy))
        c = manifest_bytes(patient_level_split(frame, seed=7, strategy=strategy))
        assert a == b and a != c


def test_attach_split_rejects_other_data(synthetic_dir, tmp_path):
    frame = source.load_metadata(synthetic_dir)
    manifest = patient_level_split(frame)
    assert set(attach_split(frame, manifest)["split"]) == {"train", "val", "test"}
    with pytest.raises(ValueError, match="not in the split manifest"):
        attach_split(frame, manifest.iloc[5:])


# -- preprocessing -------------------------------------------------------------------------

@pytest.fixture
def split_frame(synthetic_dir):
    frame = source.load_metadata(synthetic_dir)
    return attach_split(frame, patient_level_split(frame))


def test_preprocessor_uses_training_statistics_only(split_frame):
    train = split_frame[split_frame.split == "train"]
    fitted = MetadataPreprocessor().fit(train)
    age = pd.to_numeric(train["age"])
    assert fitted.means_["age"] == pytest.approx(age.mean())
    assert fitted.stds_["age"] == pytest.approx(age.std(ddof=0))
    # Changing validation rows (or adding absurd ones) does not move the fitted state.
    other = split_frame.copy()
    other.loc[other.split == "val", "age"] = "94"
    other.loc[other.split == "val", "region"] = "EAR"
    refit = MetadataPreprocessor().fit(other[other.split == "train"])
    assert refit.to_dict() == fitted.to_dict()


def test_preprocessor_encoding_and_imputation(split_frame):
    train = split_frame[split_frame.split == "train"]
    pre = MetadataPreprocessor().fit(train)
    names = pre.get_feature_names_out()
    assert "biopsed" not in names and len(names) == 21
    assert len(MetadataPreprocessor(include_biopsed=True).fit(train).get_feature_names_out()) == 22
    row = pd.DataFrame([{"age": None, "region": "FACE", "smoke": None, "itch": "UNK"}])
    out = pre.transform(row)[0]
    assert out[names.index("age")] == pytest.approx(0.0)  # training mean -> z = 0
    vocab = pre.vocabularies_
    assert out[names.index("region")] == vocab["region"].index("FACE") + 1
    assert out[names.index("smoke")] == vocab["smoke"].index(pre.modes_["smoke"]) + 1
    assert out[names.index("itch")] == vocab["itch"].index("UNK") + 1


def test_unseen_category_maps_to_reserved_code(split_frame):
    pre = MetadataPreprocessor().fit(split_frame[split_frame.split == "train"])
    row = pd.DataFrame([{"age": 50, "region": "ELBOW", "background_father": "ATLANTIS"}])
    names = pre.get_feature_names_out()
    out = pre.transform(row)[0]
    assert out[names.index("region")] == 0 and out[names.index("background_father")] == 0
    assert {(c, v) for _, c, v in pre.unseen_values(row)} == {("region", "ELBOW"), ("background_father", "ATLANTIS")}
    onehot = MetadataPreprocessor(encoding="onehot").fit(split_frame)
    encoded = onehot.transform(row)[0]
    assert encoded[onehot.get_feature_names_out().index("region=<unseen>")] == 1.0


def test_bad_values_name_row_and_column(split_frame):
    pre = MetadataPreprocessor().fit(split_frame)
    with pytest.raises(MetadataError, match=r"row 7: age must be a number, got 'abc'"):
        pre.transform(pd.DataFrame({"age": ["abc"]}, index=[7]))
    with pytest.raises(MetadataError, match=r"row 0: diameter_1=-3 is out of range"):
        pre.transform(pd.DataFrame({"age": [40], "diameter_1": [-3]}))


def test_column_table_encodes_like_the_frame(split_frame):
    # The serving path hands the preprocessor a ColumnTable; every encoding must match the DataFrame's.
    frame = split_frame.copy()
    frame.loc[frame.index[:5], "region"] = "ELBOW"  # unseen values too
    frame.index = frame.index * 3 + 7  # an index that is not 0..n-1
    table = ColumnTable.from_frame(frame)
    assert len(table) == len(frame) and table.index == list(frame.index)
    assert [type(v) for v in table["age"][:3]] == [type(v) for v in frame["age"].astype(object)[:3]]
    for kwargs in ({}, {"missing_indicators": True, "encoding": "onehot"}):
        pre = MetadataPreprocessor(**kwargs).fit(split_frame[split_frame.split == "train"])
        np.testing.assert_array_equal(pre.transform(table), pre.transform(frame))
        assert pre.unseen_values(table) == pre.unseen_values(frame)
        assert len(pre.unseen_values(table)) >= 5
    assert table.to_frame().equals(frame.astype(object))
    with pytest.raises(MetadataError, match=r"row 7: age must be a number, got 'abc'"):
        MetadataPreprocessor().fit(split_frame).transform(ColumnTable({"age": ["abc"]}, [7]))


def test_column_table_refuses_ambiguous_columns():
    frame = pd.DataFrame([[1, 2]], columns=["age", "age"])
    with pytest.raises(ValueError, match=r"more than once: \['age'\]"):
        ColumnTable.from_frame(frame)
    with pytest.raises(KeyError, match="smoke"):
        ColumnTable.from_frame(pd.DataFrame({"age": [1]}), ["age", "smoke"])
    with pytest.raises(ValueError, match="'age' has 2 values for 1 rows"):
        ColumnTable({"age": [1, 2]}, [0])


def test_json_round_trip_is_exact(split_frame, tmp_path):
    train = split_frame[split_frame.split == "train"]
    for kwargs in ({}, {"missing_indicators": True, "encoding": "onehot"}, {"include_biopsed": True}):
        pre = MetadataPreprocessor(**kwargs).fit(train)
        loaded = MetadataPreprocessor.load(pre.save(tmp_path / "pre.json"))
        np.testing.assert_array_equal(pre.transform(split_frame), loaded.transform(split_frame))
        assert loaded.get_feature_names_out() == pre.get_feature_names_out()


def test_missing_indicators(split_frame):
    pre = MetadataPreprocessor(missing_indicators=True).fit(split_frame)
    names = pre.get_feature_names_out()
    assert "diameter_1_missing" in names and "age_missing" not in names  # age is never missing
    out = pre.transform(split_frame)
    expected = split_frame["diameter_1"].isna().to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(out[:, names.index("diameter_1_missing")], expected)
