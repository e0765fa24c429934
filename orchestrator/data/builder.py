"""Build a dataset's DIR splits (METHODS §2) into Parquet, once per config, atomically.

Split schema: id int64, prompt string, target float64, bin int64, region string, and for image
datasets `image` binary (the encoded PNG/JPEG/... bytes; `orchestrator.data.images.load_image`
decodes one). Text datasets have no image column.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import DataConfig, resolve_path
from orchestrator.data.conventions import DataError
from orchestrator.data.images import summarize_images
from orchestrator.data.protocol import REGIONS, bin_counts, label_bins, region_of_count, shot_regions
from orchestrator.data.sources import load_source

SPLITS = ("train", "val", "test")
SCHEMA = pa.schema([
    ("id", pa.int64()), ("prompt", pa.string()), ("target", pa.float64()), ("bin", pa.int64()), ("region", pa.string())
])
IMAGE_SCHEMA = SCHEMA.append(pa.field("image", pa.binary()))
IMAGE_ROW_GROUP = 256  # rows per Parquet row group with images: readers can stream them in small pieces
REGION_LETTERS = {"many": "M", "medium": "m", "few": "f"}  # describe()'s histogram


def dir_split(targets: np.ndarray, label_step: float, max_per_label: int, seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / val / test: per bin, val and test each take min(max_per_label, n // 3)
    rows; the rest is the (long-tailed) training pool."""
    rng = np.random.default_rng(seed)
    bins = label_bins(targets, label_step)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for b in np.unique(bins):
        rows = rng.permutation(np.flatnonzero(bins == b))
        k = min(max_per_label, len(rows) // 3)
        out["val"].append(rows[:k])
        out["test"].append(rows[k : 2 * k])
        out["train"].append(rows[2 * k :])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


def given_split(labels) -> dict[str, np.ndarray]:
    """Row indices of each split named in a `split` column (a published split, kept as given)."""
    labels = np.asarray(labels, dtype=object)
    return {s: np.flatnonzero(labels == s) for s in SPLITS}


def subsample(rows: np.ndarray, size: int | None, seed: int) -> np.ndarray:
    """A uniform random subset keeps the natural distribution of the pool."""
    if size is None or size >= len(rows):
        return rows
    return np.sort(np.random.default_rng([seed, 1]).choice(rows, size=size, replace=False))


@dataclass(frozen=True)
class BuiltDataset:
    path: Path
    meta: dict = field(hash=False)

    def load(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """One split; `columns` reads only those (a text stage can skip the image bytes)."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {', '.join(SPLITS)}")
        return pq.read_table(self.path / f"{split}.parquet", columns=columns)

    @property
    def has_images(self) -> bool:
        """Whether the splits carry an `image` column of encoded bytes (decode with data.images.load_image)."""
        return bool(self.meta.get("has_images", False))

    @cached_property
    def _train_targets(self) -> np.ndarray:
        return np.asarray(self.load("train").column("target").to_numpy(), dtype=np.float64)

    def train_targets(self) -> np.ndarray:
        return self._train_targets

    label_step = property(lambda self: float(self.meta["label_step"]))
    label_min = property(lambda self: float(self.meta["label_min"]))
    label_max = property(lambda self: float(self.meta["label_max"]))
    many = property(lambda self: int(self.meta["many_threshold"]))
    few = property(lambda self: int(self.meta["few_threshold"]))


def load_built(path: str | Path) -> BuiltDataset:
    path = Path(path)
    missing = [f for f in (*(f"{s}.parquet" for s in SPLITS), "meta.json") if not (path / f).is_file()]
    if missing:
        raise DataError(f"no built dataset at {path}: missing {', '.join(missing)}")
    return BuiltDataset(path=path, meta=json.loads((path / "meta.json").read_text()))


def _check_writable(target_dir: Path, root: str) -> None:
    """The build folder can be created: its nearest existing ancestor is a writable folder."""
    existing = next(p for p in (target_dir, *target_dir.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(f"data.root {root!r}: {existing} is a file, not a folder; point data.root at a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"data.root {root!r}: cannot write the build under {existing} (not writable)")


def build_dataset(cfg: DataConfig, *, force: bool = False) -> BuiltDataset:
    """Splits written to {root}/{name}/{fingerprint}/; reused when the same config was built before."""
    target_dir = resolve_path(cfg.root) / cfg.name / cfg.fingerprint()
    if not force and (target_dir / "meta.json").is_file():
        return load_built(target_dir)
    _check_writable(target_dir, cfg.root)  # before reading the source: a bad root must not cost a full load
    spec, frame = load_source(cfg)
    step = cfg.label_step or spec.label_step
    given = "split" in frame.columns  # a published split is kept; only the training subset is drawn
    rows = _split_rows(frame, cfg, step)
    counts = bin_counts(frame["target"].to_numpy()[rows["train"]], step)
    tables = {}
    for split in SPLITS:
        part = frame.iloc[rows[split]]
        if len(part) == 0:
            raise _empty_split_error(cfg, split, given)
        tables[split] = _split_table(part, counts, step, cfg)
    label_range = (float(frame["target"].min()), float(frame["target"].max()))
    meta = _build_meta(cfg, spec, step, given, counts, tables, label_range)
    if meta["has_images"]:
        meta["images"] = summarize_images(frame["image"].iloc[np.concatenate([rows[s] for s in SPLITS])])
    _write_atomically(target_dir, tables, meta)
    return load_built(target_dir)


def _split_rows(frame: pd.DataFrame, cfg: DataConfig, step: float) -> dict[str, np.ndarray]:
    """Row indices of each split: as the frame's `split` column gives them, else cut by the DIR protocol;
    then the training subset of cfg.train_size rows."""
    if "split" in frame.columns:
        rows = given_split(frame["split"])
    else:
        rows = dir_split(frame["target"].to_numpy(), step, cfg.max_per_label, cfg.seed)
    rows["train"] = subsample(rows["train"], cfg.train_size, cfg.seed)
    return rows


def _empty_split_error(cfg: DataConfig, split: str, given: bool) -> DataError:
    if given:
        hint = "the dataset's split column gives it no rows"
    else:
        hint = f"lower data.max_per_label (now {cfg.max_per_label}) or raise data.train_size (now {cfg.train_size})"
    return DataError(f"dataset {cfg.name!r}: the {split} split is empty; {hint}")


def _split_table(part: pd.DataFrame, counts: dict[int, int], step: float, cfg: DataConfig) -> pa.Table:
    """One split's rows in the split schema, each with its bin and its shot region (from the training counts)."""
    regions = shot_regions(part["target"], counts, step, cfg.many_threshold, cfg.few_threshold)
    columns = {
        "id": part["id"].astype(np.int64).to_numpy(),
        "prompt": part["prompt"].astype(str).to_numpy(),
        "target": part["target"].to_numpy(),
        "bin": label_bins(part["target"], step),
        "region": regions.astype(str),
    }
    has_images = "image" in part.columns
    if has_images:
        columns["image"] = part["image"].to_numpy()  # bytes objects -> Arrow binary, never pickled
    schema = IMAGE_SCHEMA if has_images else SCHEMA
    return pa.Table.from_pandas(pd.DataFrame(columns), schema=schema, preserve_index=False)


def _region_sizes(table: pa.Table) -> dict[str, int]:
    regions = table.column("region").to_numpy(zero_copy_only=False)
    return {r: int((regions == r).sum()) for r in REGIONS}


def _build_meta(cfg: DataConfig, spec, step: float, given: bool, counts: dict[int, int], tables: dict,
                label_range: tuple[float, float]) -> dict:
    """meta.json: what the dataset is, its label range and shot thresholds, split and region sizes, and
    the config it was built from. The label range is the whole dataset's (every split, before the training
    subset is drawn): the format reward, the MAE reward's scale, the RvTC centres and the parse-failure
    penalty must reach every test target, not only those the training subset happened to draw."""
    return {
        "name": cfg.name,
        "description": spec.description,
        "target": spec.target_description,
        "label_step": step,
        "label_min": label_range[0],
        "label_max": label_range[1],
        "many_threshold": cfg.many_threshold,
        "few_threshold": cfg.few_threshold,
        "seed": cfg.seed,
        "split_source": "given" if given else "dir",
        "has_images": "image" in tables["train"].column_names,
        "sizes": {s: int(t.num_rows) for s, t in tables.items()},
        "regions": {s: _region_sizes(t) for s, t in tables.items()},
        "train_bin_counts": {str(b): c for b, c in sorted(counts.items())},
        "config": cfg.model_dump(mode="json"),
    }


def _write_atomically(target_dir: Path, tables: dict[str, pa.Table], meta: dict) -> None:
    """Write beside the destination, then rename: an interrupted or failed build never leaves half a
    dataset, and an earlier build at `target_dir` stays whole until the new one replaces it."""
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target_dir.parent))
    row_group_size = IMAGE_ROW_GROUP if meta["has_images"] else None
    try:
        for split, table in tables.items():
            pq.write_table(table, tmp / f"{split}.parquet", row_group_size=row_group_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if target_dir.exists():
            shutil.rmtree(target_dir)
        os.replace(tmp, target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(built: BuiltDataset, width: int = 50, max_lines: int = 50) -> str:
    """Split sizes, region sizes, and a text histogram of the training labels per bin."""
    m = built.meta
    lines = [f"{m['name']}: {m['description']}",
             f"target: {m['target']} (label step {m['label_step']:g}, range {m['label_min']:g} to {m['label_max']:g})"]
    if m.get("images"):
        im = m["images"]
        sizes = {tuple(im["min_size"]), tuple(im["max_size"])}
        lines.append(
            f"images: {im['count']} ({', '.join(f'{k} {v}' for k, v in im['formats'].items())}), "
            + " to ".join(f"{w}x{h}" for w, h in sorted(sizes))
        )
    if m.get("split_source") == "given":
        lines.append("splits: as given by the dataset (not cut by the DIR protocol)")
    lines.append("")
    lines.append(f"{'split':<6} {'total':>7} " + " ".join(f"{r:>7}" for r in REGIONS))
    for split in SPLITS:
        lines.append(f"{split:<6} {m['sizes'][split]:>7} " + " ".join(f"{m['regions'][split][r]:>7}" for r in REGIONS))
    counts = {int(b): c for b, c in m["train_bin_counts"].items()}
    bins = sorted(counts)
    group = max(1, -(-len(bins) // max_lines))  # merge neighbouring bins so the plot stays short
    lines += ["", f"training labels per bin (many > {m['many_threshold']}, few < {m['few_threshold']}):"]
    rows = []
    for i in range(0, len(bins), group):
        chunk = bins[i : i + group]
        rows.append((chunk[0], chunk[-1], sum(counts[b] for b in chunk), [counts[b] for b in chunk]))
    top = max(r[2] for r in rows)
    step = m["label_step"]
    for lo, hi, total, parts in rows:
        label = f"{lo * step:g}" if lo == hi else f"{lo * step:g}-{hi * step:g}"
        letters = {REGION_LETTERS[region_of_count(c, m["many_threshold"], m["few_threshold"])] for c in parts}
        region = "/".join(sorted(letters))
        lines.append(f"{label:>12} | {'#' * max(1, round(width * total / top)):<{width}} {total:>6} {region}")
    lines.append("(regions: M many, m medium, f few)")
    return "\n".join(lines)
