"""The `data` section: which dataset, and how the DIR protocol (METHODS §2) cuts it."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, model_validator

from orchestrator.config.base import StrictSection, expand_dotted, resolve_path

# Part of every dataset fingerprint, hence of the build cache's key: raised whenever the builder writes
# different splits or meta.json for the same config, so a build cached by an older builder is never reused.
DATA_BUILD_VERSION = 2


class DigitCountConfig(StrictSection):
    """The constructed `digit-count` task: canvases of K real handwritten digits (scikit-learn's digits),
    K drawn from a truncated power law P(K) ∝ K^-power over 1..max_digits, labelled by K."""

    num_images: int = Field(4000, ge=1, description="Canvases generated before the DIR split.")
    max_digits: int = Field(20, ge=1, description="K_max: the largest count.")
    power: float = Field(1.5, ge=0, description="Exponent a of P(K) ∝ K^-a; 0 is uniform, larger is more long-tailed.")
    canvas_size: int = Field(128, ge=8, description="Square canvas side in pixels.")
    digit_size: int = Field(16, ge=8, description="Side in pixels of each digit (the 8x8 originals are upscaled).")
    min_gap: int = Field(4, ge=1, description="Blank pixels at least between two digits, so none touch or overlap.")
    seed: int = Field(0, description="Seed of the generation (counts, digits, positions); data.seed cuts the splits.")

    def grid_side(self) -> int:
        """Digits sit in distinct cells of a grid, which is what guarantees they never overlap."""
        return self.canvas_size // (self.digit_size + self.min_gap)

    @model_validator(mode="after")
    def _digits_fit(self) -> "DigitCountConfig":
        cells = self.grid_side() ** 2
        if self.max_digits > cells:
            raise ValueError(
                f"max_digits ({self.max_digits}) does not fit: a {self.canvas_size}px canvas holds {cells} digits of "
                f"{self.digit_size}px with min_gap {self.min_gap}; raise canvas_size or lower digit_size/max_digits"
            )
        return self


class ManifestConfig(StrictSection):
    """An external DIR dataset (AgeDB-DIR, IMDB-WIKI-DIR, ...) listed in a Parquet, JSONL or CSV manifest.

    One row per sample: an image as a path (`image_path_column`) or as encoded bytes (`image_bytes_column`;
    base64 text in JSONL/CSV), an optional prompt, a numeric target and an optional split (train/val/test).
    With a split column the given splits are kept; without one the DIR protocol cuts them."""

    path: str | None = Field(
        None, description="The manifest file (.parquet, .jsonl, .csv); required for data.name=manifest."
    )
    image_root: str | None = Field(None, description="Folder for relative image paths; None: the manifest's folder.")
    prompt_template: str | None = Field(
        None,
        description="Prompt of rows without one; `{column}` fields are filled from the row, and the answer "
        "instruction is appended unless it mentions <answer>. None: a generic image question.",
    )
    # Optional columns: None uses the conventional name when the manifest has it; a name given here
    # must exist (a typo is an error, not a silently missing column).
    image_path_column: str | None = Field(
        None, description="Column of image file paths; None: 'image_path' if present."
    )
    image_bytes_column: str | None = Field(
        None, description="Column of encoded image bytes (base64 in JSONL/CSV); None: 'image_bytes' if present."
    )
    prompt_column: str | None = Field(None, description="Column of prompts; None: 'prompt' if present.")
    target_column: str = Field("target", description="Column of numeric targets (required).")
    split_column: str | None = Field(None, description="Column of train/val/test; None: 'split' if present.")
    description: str | None = Field(None, description="One line for `data build`; None names the file.")

    def file_stamp(self) -> dict[str, Any]:
        """Identity of the manifest file for the dataset fingerprint: a changed file is a new dataset."""
        if self.path is None:
            return {}
        p = resolve_path(self.path)
        stamp: dict[str, Any] = {"file": str(p)}
        if self.image_root is not None:
            stamp["image_root"] = str(resolve_path(self.image_root))
        try:
            st = p.stat()
            stamp.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        except OSError:
            stamp["missing"] = True  # the build refuses it with a clear message
        return stamp


class DataConfig(StrictSection):
    """Which dataset, and how the DIR protocol (METHODS §2) cuts it."""

    name: str = Field(
        "movies", description="Registered dataset: movies, diamonds, doctor-visits, digit-count, or manifest."
    )
    root: str = Field("data", description="Folder where built Parquet splits are cached.")
    label_step: float | None = Field(
        None, gt=0, description="Bin width for labels; None takes the dataset's default."
    )
    max_per_label: int = Field(30, ge=1, description="Cap per label bin in the balanced val/test splits.")
    train_size: int | None = Field(
        None, ge=1, description="Random training subset (keeps the natural distribution); None keeps all."
    )
    many_threshold: int = Field(100, ge=1, description="A bin with more training samples than this is 'many'.")
    few_threshold: int = Field(20, ge=1, description="A bin with fewer training samples than this is 'few'.")
    seed: int = Field(
        0, description="Seed of the split and of the eval.max_samples subset; independent of the training seed."
    )
    prompt_style: Literal["full", "compact"] = Field(
        "full",
        description="full: an instruction, one 'Name: value' line per feature, the answer format. compact: the "
        "feature values alone, ' | '-separated, for tiny models trained from scratch (text datasets only).",
    )
    digit_count: DigitCountConfig = Field(default_factory=DigitCountConfig, description="Options of `digit-count`.")
    manifest: ManifestConfig = Field(default_factory=ManifestConfig, description="Options of `manifest`.")

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys(cls, values: Any) -> Any:
        return expand_dotted(values)

    @model_validator(mode="after")
    def _thresholds_ordered(self) -> "DataConfig":
        if self.few_threshold > self.many_threshold:
            raise ValueError(
                f"few_threshold ({self.few_threshold}) must not exceed many_threshold ({self.many_threshold})"
            )
        if self.name == "manifest" and not self.manifest.path:
            raise ValueError("data.name=manifest needs data.manifest.path (a .parquet, .jsonl or .csv file)")
        if self.prompt_style == "compact" and self.name in ("digit-count", "manifest"):
            raise ValueError(f"data.prompt_style=compact applies to the text datasets, not {self.name!r}")
        return self

    def fingerprint(self) -> str:
        """Stable short hash of everything that changes the built splits (root excluded). A section of
        dataset options counts only for its own dataset; a manifest counts with its file's size and mtime."""
        payload = self.model_dump(exclude={"root", "digit_count", "manifest", "prompt_style"})
        payload["build_version"] = DATA_BUILD_VERSION
        if self.prompt_style != "full":
            payload["prompt_style"] = self.prompt_style
        if self.name == "digit-count":
            payload["digit_count"] = self.digit_count.model_dump()
        if self.name == "manifest":
            payload["manifest"] = {**self.manifest.model_dump(), **self.manifest.file_stamp()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
