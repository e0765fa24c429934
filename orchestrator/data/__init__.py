"""Datasets -> Parquet with DIR splits and shot regions; tokenisation and batching for the stages.

The names below load on first use: the pure maths (orchestrator/methods/) imports the DIR protocol and the
collators from this package, and the config imports those methods, so importing `orchestrator.data.protocol`
must not pull in the builder, which needs the config."""

import importlib

_HOMES = {
    "SPLITS": "builder", "BuiltDataset": "builder", "build_dataset": "builder", "describe": "builder",
    "dir_split": "builder", "load_built": "builder",
    "DataError": "conventions",
    "encode_png": "images", "load_image": "images",
    "DATASETS": "sources", "DatasetSpec": "sources", "load_source": "sources", "validate_frame": "sources",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__():
    return sorted(set(globals()) | set(_HOMES))
