"""External DIR datasets from a manifest: good manifests build, broken rows are named."""

import base64
import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.cli import main
from orchestrator.config import DataConfig, ManifestConfig
from orchestrator.data import DataError, build_dataset, load_image
from orchestrator.data.builder import SCHEMA
from orchestrator.data.manifest import manifest_frame, parse_split, parse_target, template_prompt

ANSWER = "Answer with <answer>NUMBER</answer>."  # the instruction a prompt without one gets
# 30 samples over 4 label bins with 12/9/6/3 rows: enough for the DIR protocol to cut val/test itself
TARGETS = [20.0] * 12 + [30.0] * 9 + [40.0] * 6 + [50.0] * 3
GIVEN_SPLITS = (["train"] * 8 + ["val"] * 2 + ["test"] * 2) + (["train"] * 5 + ["val", "val", "test", "test"]) + (
    ["train"] * 4 + ["val", "test"]
) + ["train", "val", "test"]


def picture(i: int) -> Image.Image:
    """A small, distinct RGB picture per sample (sizes vary, as in real datasets)."""
    rng = np.random.default_rng(i)
    side = 12 + i % 5
    return Image.fromarray(rng.integers(0, 256, (side, side + 2, 3), dtype=np.uint8))


@pytest.fixture()
def fixture_dir(tmp_path):
    """images/img_i.png (and one JPEG) written with PIL, plus the encoded bytes of each."""
    (tmp_path / "images").mkdir()
    blobs = []
    for i in range(len(TARGETS)):
        fmt, ext = ("JPEG", "jpg") if i == 5 else ("PNG", "png")
        buf = io.BytesIO()
        picture(i).save(buf, format=fmt)
        (tmp_path / "images" / f"img_{i}.{ext}").write_bytes(buf.getvalue())
        blobs.append(buf.getvalue())
    paths = [f"images/img_{i}.{'jpg' if i == 5 else 'png'}" for i in range(len(TARGETS))]
    return tmp_path, paths, blobs


def write_parquet(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_for(tmp_path, manifest_path, **options) -> DataConfig:
    return DataConfig(
        name="manifest", root=str(tmp_path / "built"), max_per_label=2, many_threshold=6, few_threshold=3,
        manifest={"path": str(manifest_path), **options},
    )


# ------------------------------------------------------------------ pure pieces


def test_row_parsers_by_hand():
    assert parse_target("42") == 42.0 and parse_target(7) == 7.0 and parse_target(" 3.5 ") == 3.5
    for bad, message in [("abc", "not a number"), ("inf", "not finite"), (float("nan"), "missing target"),
                         (None, "missing target"), (True, "not a number"), ("", "missing target")]:
        with pytest.raises(ValueError, match=message):
            parse_target(bad)
    assert parse_split(" Val ") == "val"
    with pytest.raises(ValueError, match="bad split 'training'; allowed: train, val, test"):
        parse_split("training")
    with pytest.raises(ValueError, match="empty split"):
        parse_split(None)
    assert template_prompt("How old is {name}?", {"name": "Ada"}) == f"How old is Ada?\n{ANSWER}"
    assert template_prompt("Say <answer>N</answer>", {}) == "Say <answer>N</answer>"
    with pytest.raises(ValueError, match="names 'age', which is not a column"):
        template_prompt("{age}", {"name": "Ada"})


# ------------------------------------------------------------------ good manifests


def test_parquet_with_paths_and_given_splits_keeps_the_splits(fixture_dir):
    root, paths, blobs = fixture_dir
    manifest = write_parquet(
        root / "m.parquet",
        {"image_path": paths, "target": TARGETS, "split": GIVEN_SPLITS, "who": [f"person {i}" for i in range(30)]},
    )
    built = build_dataset(cfg_for(root, manifest, prompt_template="How old is {who} in this photo?"))
    assert built.has_images and built.meta["split_source"] == "given"
    assert built.meta["images"]["formats"] == {"JPEG": 1, "PNG": 29}
    for split in ("train", "val", "test"):
        frame = built.load(split).to_pandas()
        assert frame.id.tolist() == [i for i, s in enumerate(GIVEN_SPLITS) if s == split]  # exactly as given
        for row in frame.itertuples():
            assert row.image == blobs[row.id]  # the original encoded bytes, JPEG stays JPEG
            assert row.target == TARGETS[row.id]
            assert row.prompt == f"How old is person {row.id} in this photo?\nAnswer with <answer>NUMBER</answer>."
    img = load_image(built.load("train").column("image")[0].as_py())
    assert img.mode == "RGB" and img.size == picture(0).size and (np.asarray(img) == np.asarray(picture(0))).all()
    # regions come from the training counts of the given split: label 20 has 8 train rows (many > 6), 50 one
    train = built.load("train").to_pandas()
    assert dict(zip(train.bin, train.region)) == {20: "many", 30: "medium", 40: "medium", 50: "few"}


def test_jsonl_with_base64_bytes_and_no_split_is_cut_by_the_dir_protocol(fixture_dir):
    root, _, blobs = fixture_dir
    rows = [{"image_bytes": base64.b64encode(b).decode(), "target": t} for b, t in zip(blobs, TARGETS)]
    manifest = write_jsonl(root / "m.jsonl", rows)
    built = build_dataset(cfg_for(root, manifest))
    assert built.meta["split_source"] == "dir"
    val, test = built.load("val").to_pandas(), built.load("test").to_pandas()
    assert val.groupby("bin").size().max() <= 2 and test.groupby("bin").size().max() <= 2
    assert sorted(built.meta["sizes"].values()) == [7, 7, 16]
    for frame in (val, test):
        for row in frame.itertuples():
            assert row.image == blobs[row.id]
            assert (np.asarray(load_image(row.image)) == np.asarray(load_image(blobs[row.id]))).all()
            assert row.prompt.endswith("Answer with <answer>NUMBER</answer>.")


def test_csv_with_renamed_columns_and_an_image_root(fixture_dir, tmp_path_factory):
    root, paths, _ = fixture_dir
    elsewhere = tmp_path_factory.mktemp("manifests")
    pd.DataFrame({"path": [p.removeprefix("images/") for p in paths], "age": TARGETS, "split": GIVEN_SPLITS}).to_csv(
        elsewhere / "agedb.csv", index=False
    )
    cfg = cfg_for(root, elsewhere / "agedb.csv", image_path_column="path", target_column="age",
                  image_root=str(root / "images"))
    built = build_dataset(cfg)
    assert built.meta["sizes"] == {"train": 18, "val": 6, "test": 6}
    assert built.meta["target"] == "column 'age' of the manifest"


def test_text_only_manifest_keeps_the_text_schema(tmp_path):
    rows = [{"prompt": f"What is {t:g} plus 0? Answer with <answer>NUMBER</answer>.", "target": t} for t in TARGETS]
    built = build_dataset(cfg_for(tmp_path, write_jsonl(tmp_path / "text.jsonl", rows)))
    assert not built.has_images and built.load("train").schema.names == SCHEMA.names
    assert built.load("test").column("prompt")[0].as_py().startswith("What is")


def test_a_changed_manifest_is_never_served_from_a_stale_cache(tmp_path):
    manifest = tmp_path / "text.jsonl"
    rows = [{"prompt": "p", "target": t} for t in TARGETS]
    write_jsonl(manifest, rows)
    first = build_dataset(cfg_for(tmp_path, manifest))
    assert build_dataset(cfg_for(tmp_path, manifest)).path == first.path  # unchanged: reused
    write_jsonl(manifest, [{**r, "target": r["target"] + 1} for r in rows])
    os.utime(manifest, ns=(first.path.stat().st_mtime_ns, first.path.stat().st_mtime_ns + 10**9))
    second = build_dataset(cfg_for(tmp_path, manifest))
    assert second.path != first.path
    assert set(second.load("train").column("target").to_pylist()) == {21.0, 31.0, 41.0, 51.0}


def test_relative_manifest_paths_follow_orchestrator_home(fixture_dir, monkeypatch):
    root, paths, _ = fixture_dir
    rows = [{"image_path": p, "target": t, "split": s} for p, t, s in zip(paths, TARGETS, GIVEN_SPLITS)]
    write_jsonl(root / "rel.jsonl", rows)
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(root))
    frame = manifest_frame(ManifestConfig(path="rel.jsonl"))
    assert len(frame) == 30 and frame.prompt[0] == f"What is the numeric value for this image?\n{ANSWER}"


def test_cli_builds_a_manifest_from_dotted_options(fixture_dir, capsys):
    root, paths, _ = fixture_dir
    manifest = write_parquet(root / "m.parquet", {"image_path": paths, "target": TARGETS, "split": GIVEN_SPLITS})
    argv = ["data", "build", "manifest", f"root={root / 'built'}", f"manifest.path={manifest}",
            "manifest.description=AgeDB-DIR-like fixture", "many_threshold=6", "few_threshold=3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "AgeDB-DIR-like fixture" in out and "splits: as given" in out and "images: 30 (JPEG 1, PNG 29)" in out


# ------------------------------------------------------------------ broken manifests


def broken_parquet(root, paths, change):
    columns = {"image_path": list(paths), "target": list(TARGETS), "split": list(GIVEN_SPLITS)}
    change(columns)
    if any(isinstance(t, str) for t in columns.get("target", [])):  # one Arrow type per column: text targets
        columns["target"] = [None if t is None else str(t) for t in columns["target"]]
    return write_parquet(root / "broken.parquet", columns)


def _set(column, row, value):
    def change(columns):
        columns[column][row] = value

    return change


@pytest.mark.parametrize(
    "change, options, message",
    [
        (_set("image_path", 3, "images/nope.png"), {},
         r"broken\.parquet, row 3: image file not found: .*images/nope\.png"),
        (_set("image_path", 4, "images/corrupt.png"), {}, r"broken\.parquet, row 4: unreadable image"),
        (_set("image_path", 2, "images/truncated.jpg"), {}, r"broken\.parquet, row 2: unreadable image \(OSError"),
        (_set("image_path", 6, ""), {}, r"broken\.parquet, row 6: no image \('image_path' empty\)"),
        (_set("target", 7, "forty"), {}, r"broken\.parquet, row 7: target 'forty' is not a number"),
        (_set("target", 8, "inf"), {}, r"broken\.parquet, row 8: target 'inf' is not finite"),
        (_set("target", 9, None), {}, r"broken\.parquet, row 9: missing target"),
        (_set("split", 10, "training"), {},
         r"broken\.parquet, row 10: bad split 'training'; allowed: train, val, test"),
        (_set("split", 11, None), {}, r"broken\.parquet, row 11: empty split"),
        (lambda c: c.pop("target"), {},
         r"broken\.parquet: missing column 'target' \(data\.manifest\.target_column\); has: image_path, split"),
        (lambda c: None, {"image_path_column": "img"},
         r"broken\.parquet: missing column 'img' \(data\.manifest\.image_path_column\)"),
        (lambda c: None, {"prompt_template": "Age of {name}?"},
         r"broken\.parquet, row 0: prompt_template names 'name'"),
        (lambda c: c.update(split=["train" if s == "test" else s for s in c["split"]]), {},
         r"broken\.parquet: the test split is empty \(no row has 'split' = 'test'\)"),
    ],
)
def test_broken_parquet_rows_are_named(fixture_dir, change, options, message):
    root, paths, blobs = fixture_dir
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (root / "images" / "truncated.jpg").write_bytes(blobs[5][: len(blobs[5]) // 2])
    manifest = broken_parquet(root, paths, change)
    with pytest.raises(DataError, match=message):
        build_dataset(cfg_for(root, manifest, **options))
    assert not (root / "built" / "manifest").exists() or not any((root / "built" / "manifest").iterdir())


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"image_bytes": "@@not base64@@", "target": 1}],
         r"bad\.jsonl, row 0 \(line 1\): image bytes are not valid base64"),
        ([{"image_bytes": "GOOD", "target": 1}, {"image_bytes": base64.b64encode(b"garbage").decode(), "target": 2}],
         r"bad\.jsonl, row 1 \(line 2\): unreadable image"),
        ([{"image_bytes": "GOOD", "target": 1}, "BLANK", {"image_bytes": "GOOD", "target": "n/a"}],
         r"bad\.jsonl, row 1 \(line 3\): target 'n/a' is not a number"),
        ([{"image_bytes": "GOOD", "target": 1}, "{not json"], r"bad\.jsonl, line 2: not valid JSON"),
        ([[1, 2]], r"bad\.jsonl, line 1: expected a JSON object, got list"),
        ([{"image_bytes": "GOOD", "value": 1}], r"bad\.jsonl: missing column 'target'"),
        ([{"target": 1}],
         r"bad\.jsonl: a manifest without images needs a 'prompt' column or data\.manifest\.prompt_template"),
    ],
)
def test_broken_jsonl_rows_are_named_with_their_line(tmp_path, lines, message):
    good = base64.b64encode(_png()).decode()
    text = ""
    for item in lines:
        if item == "BLANK":
            text += "\n"
        elif item == "{not json":
            text += item + "\n"
        else:
            if isinstance(item, dict) and item.get("image_bytes") == "GOOD":
                item = {**item, "image_bytes": good}
            text += json.dumps(item) + "\n"
    (tmp_path / "bad.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        manifest_frame(ManifestConfig(path=str(tmp_path / "bad.jsonl")))


def _png() -> bytes:
    buf = io.BytesIO()
    picture(1).save(buf, format="PNG")
    return buf.getvalue()


def test_unknown_format_missing_file_and_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"unknown format '\.txt'"):
        manifest_frame(ManifestConfig(path=str(tmp_path / "m.txt")))
    with pytest.raises(DataError, match=r"manifest not found: .*nothere\.parquet"):
        build_dataset(
            DataConfig(name="manifest", root=str(tmp_path), manifest={"path": str(tmp_path / "nothere.parquet")})
        )
    with pytest.raises(ValueError, match="data.name=manifest needs data.manifest.path"):
        DataConfig(name="manifest")


def test_a_run_config_with_every_default_written_out_still_treats_columns_as_optional(fixture_dir):
    # load_run_config writes every default into the tree, so "unset" must not mean "not in the tree"
    from orchestrator.config import load_run_config

    root, paths, _ = fixture_dir
    manifest = write_jsonl(root / "plain.jsonl", [{"image_path": p, "target": t} for p, t in zip(paths, TARGETS)])
    cfg = load_run_config(overrides=["data.name=manifest", f"data.manifest.path={manifest}"])
    frame = manifest_frame(cfg.data.manifest)
    assert "split" not in frame.columns and len(frame) == 30 and frame.image.map(len).min() > 0


def test_many_rows_are_read_in_parallel_and_the_first_bad_row_is_named(tmp_path):
    blobs = [_png()] * 100
    blobs[90] = b"broken"
    blobs[70] = _png()[:50]
    manifest = write_parquet(tmp_path / "many.parquet", {"image_bytes": blobs, "target": [1.0] * 100})
    with pytest.raises(DataError, match=r"many\.parquet, row 70: unreadable image"):
        manifest_frame(ManifestConfig(path=str(manifest)))
    blobs[70] = blobs[90] = _png()
    write_parquet(tmp_path / "many.parquet", {"image_bytes": blobs, "target": [1.0] * 100})
    assert manifest_frame(ManifestConfig(path=str(manifest))).image.tolist() == blobs
