"""The image data layer: encoded-bytes helpers and the `digit-count` task built from real digits."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from orchestrator.cli import main
from orchestrator.config import DataConfig, DigitCountConfig
from orchestrator.data import build_dataset, load_image
from orchestrator.data.builder import IMAGE_SCHEMA, SCHEMA
from orchestrator.data.digit_count import (
    PROMPT,
    digit_count_frame,
    digit_glyphs,
    generate,
    place_digits,
    power_law_probs,
)
from orchestrator.data.images import decode_base64, encode_png, inspect_image, summarize_images
from orchestrator.data.protocol import region_of_count

INK = 32  # grey levels darker than 255 - INK count as ink
SMALL = dict(num_images=600, max_digits=8, canvas_size=64, digit_size=12, min_gap=2, seed=3)


def ink_blobs(img: Image.Image) -> int:
    """Connected ink blobs (8-connectivity) on a decoded canvas: what a person would count."""
    grey = np.asarray(img.convert("L"))
    return ndimage.label(grey < 255 - INK, structure=np.ones((3, 3)))[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cfg = DataConfig(
        name="digit-count",
        root=str(tmp_path_factory.mktemp("data")),
        max_per_label=10,
        many_threshold=50,
        few_threshold=10,
        digit_count=SMALL,
    )
    return cfg, build_dataset(cfg)


# ------------------------------------------------------------------ bytes helpers


def test_png_round_trip_gives_rgb_of_the_same_pixels():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    data = encode_png(Image.fromarray(grey))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    img = load_image(data)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert (np.asarray(img)[..., 0] == grey).all() and (np.asarray(img)[..., 2] == grey).all()
    assert inspect_image(data).format == "PNG" and (inspect_image(data).width, inspect_image(data).height) == (8, 8)
    assert summarize_images([data, data]) == {"count": 2, "formats": {"PNG": 2}, "min_size": [8, 8], "max_size": [8, 8]}


def test_broken_bytes_are_refused():
    good = encode_png(Image.new("RGB", (32, 32), (10, 200, 30)))
    with pytest.raises(ValueError, match="unreadable image"):
        inspect_image(b"certainly not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(ValueError, match="unreadable image"):
        inspect_image(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated: verify() alone would pass it
    with pytest.raises(ValueError, match="unreadable image"):
        inspect_image(good[:-20])
    with pytest.raises(TypeError, match="expected encoded image bytes"):
        load_image("a/path.png")


def test_base64_decoding_is_strict_but_accepts_wrapping_and_data_uris():
    raw = bytes(range(200))
    text = base64.b64encode(raw).decode()
    assert decode_base64(text) == raw
    assert decode_base64("\n".join(text[i : i + 76] for i in range(0, len(text), 76))) == raw
    assert decode_base64("data:image/png;base64," + text) == raw
    with pytest.raises(ValueError, match="not valid base64"):
        decode_base64("abc$")


# ------------------------------------------------------------------ digit-count pieces


def test_power_law_by_hand():
    assert np.allclose(power_law_probs(3, 1.0), [6 / 11, 3 / 11, 2 / 11])
    assert np.allclose(power_law_probs(4, 0.0), [0.25] * 4)
    assert np.allclose(power_law_probs(2, 2.0), [0.8, 0.2])


def test_glyphs_are_the_real_digits_each_one_blob():
    for size in (12, 16):
        glyphs = digit_glyphs(size)
        assert glyphs.shape == (1797, size, size) and glyphs.dtype == np.uint8
        assert len({g.tobytes() for g in glyphs}) > 1700  # real, varied scans, not a template
        blobs = [ndimage.label(g > INK, structure=np.ones((3, 3)))[1] for g in glyphs]
        assert set(blobs) == {1}


def test_placements_never_overlap_and_keep_the_gap():
    rng = np.random.default_rng(0)
    canvas, size, gap = 64, 12, 2
    cells = (canvas // (size + gap)) ** 2
    for _ in range(50):
        corners = place_digits(cells, canvas, size, gap, rng)  # a full canvas is the hardest case
        assert corners.min() >= 0 and corners.max() + size <= canvas
        for i in range(len(corners)):
            for j in range(i):
                dr, dc = np.abs(corners[i] - corners[j])
                assert max(dr, dc) >= size + gap  # separated along rows or columns by >= gap blank pixels
    with pytest.raises(ValueError, match="do not fit"):
        place_digits(cells + 1, canvas, size, gap, rng)


def test_config_refuses_a_canvas_too_small_before_any_work():
    with pytest.raises(ValidationError, match="max_digits \\(50\\) does not fit"):
        DigitCountConfig(max_digits=50, canvas_size=64, digit_size=12)


def test_every_canvas_holds_exactly_its_label_in_digits():
    cfg = DigitCountConfig(**{**SMALL, "num_images": 200})
    glyphs = digit_glyphs(cfg.digit_size)
    for canvas in generate(cfg):
        assert len(canvas.corners) == len(canvas.digit_ids) == canvas.count
        ink = canvas.pixels < 255 - INK
        inside = np.zeros_like(ink)
        for (r, c), d in zip(canvas.corners, canvas.digit_ids):
            inside[r : r + cfg.digit_size, c : c + cfg.digit_size] = True
            # the pasted patch is that real digit, pixel for pixel
            assert (255 - canvas.pixels[r : r + cfg.digit_size, c : c + cfg.digit_size] == glyphs[d]).all()
        assert not (ink & ~inside).any()  # no ink outside the placed digits
        assert ndimage.label(ink, structure=np.ones((3, 3)))[1] == canvas.count


def test_generation_is_deterministic_by_seed():
    cfg = DigitCountConfig(**{**SMALL, "num_images": 40})
    a, b = digit_count_frame(cfg), digit_count_frame(cfg)
    assert a.target.tolist() == b.target.tolist() and a.image.tolist() == b.image.tolist()
    c = digit_count_frame(cfg.model_copy(update={"seed": 4}))
    assert c.image.tolist() != a.image.tolist()
    assert (a.prompt == PROMPT).all() and "How many handwritten digits" in PROMPT


# ------------------------------------------------------------------ the built dataset


def test_built_canvases_decode_to_the_configured_size_and_show_the_label(small):
    cfg, built = small
    assert built.has_images and built.meta["images"]["formats"] == {"PNG": cfg.digit_count.num_images}
    for split in ("train", "val", "test"):
        table = built.load(split)
        assert table.schema.names == IMAGE_SCHEMA.names
        assert table.schema.field("image").type == IMAGE_SCHEMA.field("image").type
        for cell, target in zip(table.column("image").to_pylist(), table.column("target").to_pylist()):
            img = load_image(cell)
            assert img.size == (64, 64) and img.mode == "RGB"
            assert ink_blobs(img) == target
    assert built.load("val", columns=["id", "target"]).column_names == ["id", "target"]


def test_labels_are_long_tailed(small):
    cfg, built = small
    targets = np.concatenate([built.load(s).column("target").to_numpy() for s in ("train", "val", "test")])
    counts = np.bincount(targets.astype(int), minlength=9)[1:]
    assert counts.sum() == cfg.digit_count.num_images and set(np.unique(targets)) <= set(range(1, 9))
    assert counts[0] > counts[1] > counts[3] > counts[7]
    freq = counts / counts.sum()
    assert np.abs(freq - power_law_probs(8, cfg.digit_count.power)).max() < 0.04
    train = built.load("train").column("target").to_numpy()
    assert (train <= 2).mean() > 0.6  # the natural training split keeps the head heavy


def test_splits_follow_the_dir_protocol(small):
    cfg, built = small
    columns = ["id", "target", "bin", "region"]
    train, val, test = (built.load(s, columns=columns).to_pandas() for s in ("train", "val", "test"))
    total = np.bincount(np.concatenate([f.bin for f in (train, val, test)]))
    for frame in (val, test):
        per_bin = frame.groupby("bin").size()
        assert per_bin.max() <= cfg.max_per_label
        assert all(n <= total[b] // 3 for b, n in per_bin.items())
    assert not (set(train.id) & set(val.id)) and not (set(val.id) & set(test.id)) and not (set(train.id) & set(test.id))
    counts = train.groupby("bin").size().to_dict()
    for frame in (train, val, test):
        assert frame.region.tolist() == [region_of_count(counts.get(b, 0), 50, 10) for b in frame.bin]
    assert built.meta["split_source"] == "dir" and {"many", "few"} <= set(train.region)
    again = build_dataset(cfg, force=True)
    assert again.load("test").equals(built.load("test"))


def test_only_the_dataset_own_options_enter_the_fingerprint():
    base = DataConfig(name="movies")
    assert base.fingerprint() == base.model_copy(update={"digit_count": DigitCountConfig(num_images=10)}).fingerprint()
    dc = DataConfig(name="digit-count")
    assert dc.fingerprint() != DataConfig(name="digit-count", digit_count={"num_images": 10}).fingerprint()


def test_text_datasets_keep_their_schema(tmp_path):
    built = build_dataset(DataConfig(name="doctor-visits", root=str(tmp_path), max_per_label=10))
    assert not built.has_images and built.load("train").schema.names == SCHEMA.names
    assert "images:" not in built.meta and built.meta["split_source"] == "dir"


def test_dotted_keys_reach_nested_options_from_the_cli(tmp_path, capsys):
    cfg = DataConfig.model_validate({"name": "digit-count", "digit_count.num_images": "50", "digit_count.seed": "2"})
    assert cfg.digit_count.num_images == 50 and cfg.digit_count.seed == 2 and cfg.digit_count.max_digits == 20
    argv = ["data", "build", "digit-count", f"root={tmp_path}", "max_per_label=3", "digit_count.num_images=120",
            "digit_count.max_digits=4", "digit_count.canvas_size=48", "digit_count.digit_size=10"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "real handwritten digits" in out and "images: 120 (PNG 120), 48x48" in out
    assert main(["data", "build", "digit-count", f"root={tmp_path}", "digit_count.canvas_sise=48"]) == 2
    assert "canvas_sise" in capsys.readouterr().err
