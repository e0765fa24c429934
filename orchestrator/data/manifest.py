"""External DIR datasets (AgeDB-DIR, IMDB-WIKI-DIR, IMDB-Movie-DIR, BoneAge-DIR, ...) from a manifest.

A manifest is a Parquet, JSONL or CSV file, one row per sample:

- an image, as a file path (`image_path`; relative paths are taken against `image_root`, else the
  manifest's folder) or as encoded bytes (`image_bytes`; binary in Parquet, base64 text in JSONL/CSV,
  or a Hugging Face `{"bytes", "path"}` struct). Neither column: a text-only dataset.
- a prompt (`prompt`, optional: rows without one get `prompt_template`),
- a numeric `target`,
- an optional `split` (train / val / test): given splits are kept as published; without the
  column the DIR protocol cuts them.

Column names are configurable (`data.manifest.*_column`). Every image is read and fully decoded
before anything is written, and stored as its original encoded bytes. Every problem is reported
with the manifest file and the row (0-based, the built `id`; JSONL also gives the line).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from orchestrator.config import ManifestConfig, resolve_path
from orchestrator.data.conventions import ANSWER_INSTRUCTION, SPLIT_NAMES, DataError
from orchestrator.data.images import decode_base64, inspect_image

DEFAULT_IMAGE_PROMPT = "What is the numeric value for this image?"
CONVENTIONAL_COLUMNS = {
    "image_path_column": "image_path",
    "image_bytes_column": "image_bytes",
    "prompt_column": "prompt",
    "split_column": "split",
}
SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


def _is_missing(value: Any) -> bool:
    """None, NaN and empty strings all mean "no value" (pandas turns JSON nulls into NaN or None)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def read_manifest(path: Path) -> tuple[pd.DataFrame, list[int] | None]:
    """The manifest's rows, and for JSONL the 1-based line of each row (blank lines are skipped)."""
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"manifest {path}: unknown format {path.suffix!r}; use {', '.join(sorted(SUFFIXES))}")
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    try:
        if kind == "parquet":
            return pq.read_table(path).to_pandas(), None
        if kind == "csv":
            # dtype=object: keep targets as written so a bad one is reported as written
            return pd.read_csv(path, dtype=object, keep_default_na=True), None
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"manifest {path}: not a readable {kind} file ({exc})") from None
    rows, lines = [], []
    try:
        texts = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): JSON strings may hold U+2028
    except UnicodeDecodeError as exc:
        raise DataError(f"manifest {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"manifest {path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"manifest {path}, line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        lines.append(number)
    return pd.DataFrame(rows), lines


def parse_target(value: Any) -> float:
    """A finite number (or its text); raises ValueError saying what is wrong."""
    if _is_missing(value):
        raise ValueError("missing target")
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"target {value!r} is not a number")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"target {value!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"target {value!r} is not finite")
    return number


def parse_split(value: Any) -> str:
    """train / val / test (case and surrounding blanks ignored); raises ValueError otherwise."""
    if _is_missing(value):
        raise ValueError(f"empty split; every row needs one of {', '.join(SPLIT_NAMES)}")
    name = str(value).strip().lower()
    if name not in SPLIT_NAMES:
        raise ValueError(f"bad split {value!r}; allowed: {', '.join(SPLIT_NAMES)}")
    return name


def template_prompt(template: str, row: dict[str, Any]) -> str:
    """Fill `{column}` fields from the row; add the answer instruction unless the template has one."""
    try:
        text = template.format_map(row)
    except KeyError as exc:
        raise ValueError(f"prompt_template names {exc.args[0]!r}, which is not a column of the manifest") from None
    except (IndexError, ValueError) as exc:
        raise ValueError(f"prompt_template {template!r} is not a valid format string ({exc})") from None
    return text if "<answer>" in text else f"{text.rstrip()}\n{ANSWER_INSTRUCTION}"


def resolve_image_path(value: Any, base: Path) -> Path:
    """An image path from the manifest: absolute as given, relative to `base`."""
    p = Path(str(value).strip()).expanduser()
    return p if p.is_absolute() else base / p


def image_bytes_from_cell(value: Any) -> bytes:
    """Encoded bytes from a bytes cell: raw bytes (Parquet) or base64 text (JSONL, CSV)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return decode_base64(value)
    raise ValueError(f"image bytes must be bytes or base64 text, got {type(value).__name__}")


def _present(frame: pd.DataFrame, cfg: ManifestConfig, field: str, where: str) -> str | None:
    """The column a `*_column` option names, or None when absent. Unset, the conventional name is used
    if the manifest has it; a name the user gave must exist, so a typo is an error."""
    column = getattr(cfg, field)
    if column is None:
        return CONVENTIONAL_COLUMNS[field] if CONVENTIONAL_COLUMNS[field] in frame.columns else None
    if column not in frame.columns:
        has = ", ".join(map(str, frame.columns))
        raise DataError(f"{where}: missing column {column!r} (data.manifest.{field}); has: {has}")
    return column


def _read_image(row: dict[str, Any], path_col: str | None, bytes_col: str | None, base: Path) -> bytes | None:
    """The encoded, fully decodable bytes of one row's image, or None for a row of a text-only manifest."""
    if path_col is None and bytes_col is None:
        return None
    cell, ref = (row[bytes_col] if bytes_col is not None else None), None
    if isinstance(cell, dict):  # Hugging Face's Image struct: the bytes, else a path
        cell, ref = cell.get("bytes"), cell.get("path")
    if not _is_missing(cell):
        data = image_bytes_from_cell(cell)
    elif not _is_missing(ref):
        data = _read_file(resolve_image_path(ref, base))
    elif path_col is not None and not _is_missing(row[path_col]):
        data = _read_file(resolve_image_path(row[path_col], base))
    else:
        names = " and ".join(repr(c) for c in (path_col, bytes_col) if c is not None)
        raise ValueError(f"no image ({names} empty)")
    inspect_image(data)
    return data


def _read_file(path: Path) -> bytes:
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image file {path} ({exc.strerror})") from None


def _map_rows(fn: Callable[[int], Any], n: int, where: Callable[[int], str], threads: int = 1) -> list[Any]:
    """fn over rows 0..n-1, a ValueError becoming a DataError that names the row. With threads > 1
    (image decoding, where PIL releases the GIL) the first failing row in manifest order is reported."""

    def guarded(i: int) -> Any:
        try:
            return fn(i)
        except ValueError as exc:
            raise DataError(f"{where(i)}: {exc}") from None

    if threads <= 1 or n < 64:
        return [guarded(i) for i in range(n)]
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        return list(pool.map(guarded, range(n)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after an error, skip the rows not yet started


def manifest_frame(cfg: ManifestConfig) -> pd.DataFrame:
    """Validated columns id (the manifest row), prompt, target, and `image` (bytes) / `split` when given."""
    if not cfg.path:
        raise DataError("data.name=manifest needs data.manifest.path")
    path = resolve_path(cfg.path)
    frame, lines = read_manifest(path)
    where_file = f"manifest {path}"

    def where(i: int) -> str:
        return f"{where_file}, row {i}" + (f" (line {lines[i]})" if lines else "")

    if len(frame) == 0:
        raise DataError(f"{where_file} has no rows")
    target_col = cfg.target_column
    if target_col not in frame.columns:
        raise DataError(
            f"{where_file}: missing column {target_col!r} (data.manifest.target_column); "
            f"has: {', '.join(map(str, frame.columns))}"
        )
    path_col = _present(frame, cfg, "image_path_column", where_file)
    bytes_col = _present(frame, cfg, "image_bytes_column", where_file)
    prompt_col = _present(frame, cfg, "prompt_column", where_file)
    split_col = _present(frame, cfg, "split_column", where_file)
    has_images = path_col is not None or bytes_col is not None
    template = cfg.prompt_template
    if template is None and has_images:
        template = DEFAULT_IMAGE_PROMPT
    if prompt_col is None and template is None:
        raise DataError(
            f"{where_file}: a manifest without images needs a {cfg.prompt_column or 'prompt'!r} column "
            "or data.manifest.prompt_template"
        )

    records = frame.to_dict(orient="records")
    base = resolve_path(cfg.image_root) if cfg.image_root else path.parent

    def check(parse: Callable[[Any], Any], column: str) -> Callable[[int], Any]:
        return lambda i: parse(records[i][column])

    targets = _map_rows(check(parse_target, target_col), len(records), where)
    splits = _map_rows(check(parse_split, split_col), len(records), where) if split_col else None
    if splits is not None:  # before the images are read: a wrong split column is a cheap, early error
        empty = [s for s in SPLIT_NAMES if s not in set(splits)]
        if empty:
            raise DataError(
                f"{where_file}: the {empty[0]} split is empty (no row has {split_col!r} = {empty[0]!r}); "
                f"give every split rows, or drop the {split_col!r} column to let the DIR protocol cut them"
            )

    def prompt(i: int) -> str:
        given = records[i][prompt_col] if prompt_col else None
        if not _is_missing(given):
            return str(given)
        if template is None:
            raise ValueError(f"empty prompt in column {prompt_col!r} and no data.manifest.prompt_template")
        return template_prompt(template, records[i])

    prompts = _map_rows(prompt, len(records), where)
    out = pd.DataFrame({"id": np.arange(len(records), dtype=np.int64), "prompt": prompts, "target": targets})
    if has_images:

        def image(i: int) -> bytes | None:
            return _read_image(records[i], path_col, bytes_col, base)

        out["image"] = _map_rows(image, len(records), where, threads=max(1, min(8, os.cpu_count() or 1)))
    if splits is not None:
        out["split"] = splits
    return out
