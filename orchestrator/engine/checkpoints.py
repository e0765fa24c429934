"""Checkpoint integrity: a checkpoint is complete only if every rank's manifest is there and every
file it lists has the recorded size and, where its bytes are read (at restore), the recorded sha256.

Ray Train copies each rank's checkpoint files straight into the final `checkpoint_<time>` folder, so
a disk that fills up mid-copy leaves a folder that looks like a checkpoint. Ray does not register it
(the previous checkpoint stays the latest), but a restore must never trust one either: each rank
writes a manifest of its own files last, `verify_checkpoint` checks them, and after a failure
`quarantine_incomplete` renames half-written folders `*.incomplete` (nothing is deleted), on a local
disk or in object storage alike. A checkpoint whose bytes changed after it was written (a flipped bit,
a truncated upload that kept its size) fails the sha256 check at restore, and the restore falls back
to the newest earlier checkpoint that verifies (`previous_complete`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.engine.storage import Storage, file_sha256

MANIFEST_PREFIX = "manifest-rank"
STATE_FILE = "orchestrator_state.json"
CHECKPOINT_PREFIX = "checkpoint_"


def write_manifest(folder: str | Path, rank: int) -> Path:
    """Record the size and sha256 of every file this rank put in `folder` (call it after writing them)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)
    }
    path = folder / f"{MANIFEST_PREFIX}{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, sort_keys=True))
    os.replace(tmp, path)
    return path


def _manifest_ranks(folder: Storage, state: dict) -> list[int]:
    """The ranks whose manifests must be there: 0..world_size-1, or (a state without a world size) those
    present."""
    if "world_size" in state:
        return list(range(int(state["world_size"])))
    names = [n for n in folder.list() if n.startswith(MANIFEST_PREFIX) and n.endswith(".json")]
    return sorted(int(n[len(MANIFEST_PREFIX) : -len(".json")]) for n in names)


def _file_problems(folder: Storage, name: str, expected, sizes: dict[str, int], contents: bool) -> list[str]:
    """A manifest entry is {"size", "sha256"} (or, from before hashes were recorded, the size alone)."""
    size, digest = (expected["size"], expected.get("sha256")) if isinstance(expected, dict) else (expected, None)
    if name not in sizes:
        return [f"{name} is missing"]
    if sizes[name] != size:
        return [f"{name} has {sizes[name]} bytes, not {size}"]
    if contents and digest is not None and _sha256(folder, name) != digest:
        return [f"{name} differs from what was written (sha256 mismatch)"]
    return []


def _sha256(folder: Storage, name: str) -> str:
    if folder.is_local:
        return file_sha256(Path(folder.path(name)))
    import hashlib

    return hashlib.sha256(folder.read_bytes(name)).hexdigest()


def verify_checkpoint(folder: str | Path | Storage, contents: bool = False) -> list[str]:
    """What is wrong with a checkpoint folder (local, or in storage); an empty list means it is complete.
    Sizes are always checked; `contents` also checks every file's sha256 (reads every byte)."""
    folder = folder if isinstance(folder, Storage) else Storage(str(folder))
    try:
        state = json.loads(folder.read_text(STATE_FILE))
        ranks = _manifest_ranks(folder, state)
    except FileNotFoundError:
        return [f"{STATE_FILE} is missing"]
    except (ValueError, TypeError, AttributeError) as exc:
        return [f"{STATE_FILE} is unreadable: {exc}"]
    sizes = folder.files()
    problems = []
    for rank in ranks:
        try:
            files = json.loads(folder.read_text(f"{MANIFEST_PREFIX}{rank}.json"))["files"]
        except FileNotFoundError:
            problems.append(f"rank {rank}'s manifest is missing")
            continue
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"rank {rank}'s manifest is unreadable: {exc}")
            continue
        for name, expected in files.items():
            problems += _file_problems(folder, name, expected, sizes, contents)
    return problems


def checkpoint_names(run_dir: Storage) -> list[str]:
    """The run's checkpoint folders (set-aside ones excluded), newest first: Ray Train names them by time."""
    names = [n for n in run_dir.list() if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(".incomplete")]
    return sorted(names, reverse=True)


def previous_complete(run_dir: Storage, exclude: str, local: str | Path) -> tuple[str, Path] | None:
    """The newest of the run's checkpoints other than `exclude` whose every file arrives intact at `local`:
    (its name, the local copy), or None when none does."""
    import shutil

    import pyarrow.fs as pafs

    for name in checkpoint_names(run_dir):
        if name == exclude or not run_dir.is_dir(name) or verify_checkpoint(run_dir.child(name)):
            continue
        target = Path(local) / name
        target.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(run_dir.path(name), str(target.resolve()), source_filesystem=run_dir.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        if not verify_checkpoint(target, contents=True):
            return name, target
        shutil.rmtree(target, ignore_errors=True)
    return None


def quarantine_incomplete(run_dir: str | Path | Storage) -> list[str]:
    """Rename the run's `checkpoint_*` folders that fail verification to `*.incomplete` (local or in
    storage); returns the new names."""
    run_dir = run_dir if isinstance(run_dir, Storage) else Storage(str(run_dir))
    moved = []
    for name in run_dir.list():
        if name.startswith(CHECKPOINT_PREFIX) and not name.endswith(".incomplete") and run_dir.is_dir(name):
            if verify_checkpoint(run_dir.child(name)):
                run_dir.move(name, name + ".incomplete")
                moved.append(name + ".incomplete")
    return moved
