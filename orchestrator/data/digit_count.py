"""`digit-count`: a constructed image-counting task on REAL handwritten digits, with long-tailed counts.

The images are real: the 1,797 8x8 scans of handwritten digits that scikit-learn bundles
(`sklearn.datasets.load_digits`, the UCI "optical recognition of handwritten digits" test set; no
download). The task is constructed: each canvas holds K of those digits, upscaled and placed without
overlap, with K drawn from a truncated power law P(K) ∝ K^-a over 1..K_max, and the label is K. The
natural (training) distribution is therefore long-tailed like an age or rating DIR set, and the
count of digits on a canvas equals its label by construction. Everything is a function of the seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from PIL import Image

from orchestrator.config import DigitCountConfig
from orchestrator.data.images import encode_png

PROMPT = "How many handwritten digits are in this image? Answer with <answer>NUMBER</answer>."


def power_law_probs(max_digits: int, power: float) -> np.ndarray:
    """P(K = k) for k = 1..max_digits, proportional to k^-power (power 0 is uniform)."""
    weights = np.arange(1, max_digits + 1, dtype=np.float64) ** -float(power)
    return weights / weights.sum()


@lru_cache(maxsize=4)
def digit_glyphs(size: int) -> np.ndarray:
    """The real digits as ink masks, shape (1797, size, size), uint8 (0 blank .. 255 full ink).

    The 8x8 originals hold ink levels 0..16; bilinear upscaling keeps strokes joined, so each glyph
    stays one 8-connected blob at any ink threshold up to ~32 (checked by the tests)."""
    from sklearn.datasets import load_digits  # the bundled CSV; imported here to keep `import orchestrator.data` light

    levels = load_digits().images  # (1797, 8, 8) floats in 0..16
    small = np.clip(np.rint(levels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    glyphs = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.BILINEAR)) for g in small])
    glyphs.setflags(write=False)  # shared by the cache
    return glyphs


def place_digits(k: int, canvas_size: int, digit_size: int, min_gap: int, rng: np.random.Generator) -> np.ndarray:
    """Top-left corners (row, col) of k non-overlapping digits, at least min_gap pixels apart.

    Each digit takes a distinct cell of an n x n grid (cell >= digit_size + min_gap) and is jittered
    inside its cell by at most cell - digit_size - min_gap, so neighbours keep >= min_gap blank pixels.
    Rejection sampling would need no grid but could fail to terminate on a crowded canvas."""
    n = canvas_size // (digit_size + min_gap)
    if k > n * n:
        raise ValueError(f"{k} digits of {digit_size}px do not fit a {canvas_size}px canvas with gap {min_gap}")
    cell = canvas_size // n
    margin = (canvas_size - n * cell) // 2 + min_gap // 2  # centres the grid on the canvas
    cells = rng.choice(n * n, size=k, replace=False)
    jitter = rng.integers(0, cell - digit_size - min_gap, size=(k, 2), endpoint=True)
    return np.stack([cells // n, cells % n], axis=1) * cell + margin + jitter


def render_canvas(glyphs: np.ndarray, corners: np.ndarray, canvas_size: int) -> np.ndarray:
    """Grey canvas (uint8, 255 white paper, dark ink) with glyph i pasted at corners[i]."""
    ink = np.zeros((canvas_size, canvas_size), dtype=np.uint8)
    size = glyphs.shape[1]
    for glyph, (r, c) in zip(glyphs, corners):
        ink[r : r + size, c : c + size] = glyph
    return 255 - ink


@dataclass(frozen=True)
class Canvas:
    """One generated sample and its placement record (what makes the label checkable)."""

    count: int
    digit_ids: np.ndarray  # indices into load_digits()
    corners: np.ndarray  # (count, 2) top-left (row, col)
    pixels: np.ndarray  # (canvas_size, canvas_size) uint8 grey


def generate(cfg: DigitCountConfig) -> Iterator[Canvas]:
    """cfg.num_images canvases, deterministic in cfg.seed: counts first, then per canvas its digits and cells."""
    glyphs = digit_glyphs(cfg.digit_size)
    rng = np.random.default_rng(cfg.seed)
    law = power_law_probs(cfg.max_digits, cfg.power)
    counts = rng.choice(np.arange(1, cfg.max_digits + 1), size=cfg.num_images, p=law)
    for k in counts:
        ids = rng.integers(0, len(glyphs), size=int(k))  # digits drawn with replacement from all 1,797
        corners = place_digits(int(k), cfg.canvas_size, cfg.digit_size, cfg.min_gap, rng)
        yield Canvas(int(k), ids, corners, render_canvas(glyphs[ids], corners, cfg.canvas_size))


def digit_count_frame(cfg: DigitCountConfig) -> pd.DataFrame:
    """Columns id, prompt, target (K), image (PNG bytes, 8-bit grey; `load_image` gives RGB)."""
    images, targets = [], []
    for canvas in generate(cfg):
        images.append(encode_png(Image.fromarray(canvas.pixels)))
        targets.append(float(canvas.count))
    n = len(targets)
    return pd.DataFrame({"id": np.arange(n), "prompt": [PROMPT] * n, "target": targets, "image": images})
