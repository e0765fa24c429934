"""Datasets -> Parquet with DIR splits and shot regions; tokenisation and batching for the stages."""

from orchestrator.data.builder import SPLITS, BuiltDataset, build_dataset, describe, dir_split, load_built
from orchestrator.data.conventions import DataError
from orchestrator.data.images import encode_png, load_image
from orchestrator.data.sources import DATASETS, DatasetSpec, load_source, validate_frame

__all__ = [
    "DATASETS",
    "SPLITS",
    "BuiltDataset",
    "DataError",
    "DatasetSpec",
    "build_dataset",
    "describe",
    "dir_split",
    "encode_png",
    "load_built",
    "load_image",
    "load_source",
    "validate_frame",
]
