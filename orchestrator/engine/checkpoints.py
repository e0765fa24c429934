"""Checkpoint integrity: a checkpoint is complete only if every rank's manifest is there and every
file it lists has the recorded size.

Ray Train copies each rank's checkpoint files straight into the final `checkpoint_<time>` folder, so
a disk that fills up mid-copy leaves a folder that looks like a checkpoint. Ray does not register it
(the previous checkpoint stays the latest), but a restore must never trust one either: each rank
writes a manifest of its own files last, `verify_checkpoint` checks them, and after a failure
`quarantine_incomplete` renames half-written folders `*.incomplete` (nothing is deleted), on a local
disk or in object storage alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

from orchestrator.engine.storage import Storage

MANIFEST_PREFIX = "manifest-rank"
STATE_FILE = "orchestrator_state.json"


def write_manifest(folder: str | Path, rank: int) -> Path:
    """Record the size of every file this rank put in `folder` (call it after writing them)."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(MANIFEST_PREFIX)
    }
    path = folder / f"{MANIFEST_PREFIX}{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "files": files}, sort_keys=True))
    os.replace(tmp, path)
    return path


def verify_checkpoint(folder: str | Path | Storage) -> list[str]:
    """What is wrong with a checkpoint folder (local, or in storage); an empty list means it is complete."""
    folder = folder if isinstance(folder, Storage) else Storage(str(folder))
    try:
        state = json.loads(folder.read_text(STATE_FILE))
        world_size = int(state["world_size"]) if "world_size" in state else None
    except FileNotFoundError:
        return [f"{STATE_FILE} is missing"]
    except (ValueError, TypeError, AttributeError) as exc:
        return [f"{STATE_FILE} is unreadable: {exc}"]
    if world_size is None:  # no world size recorded: no manifests to check the files against
        return []
    sizes = folder.files()
    problems = []
    for rank in range(world_size):
        try:
            files = json.loads(folder.read_text(f"{MANIFEST_PREFIX}{rank}.json"))["files"]
        except FileNotFoundError:
            problems.append(f"rank {rank}'s manifest is missing")
            continue
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"rank {rank}'s manifest is unreadable: {exc}")
            continue
        for name, size in files.items():
            if name not in sizes:
                problems.append(f"{name} is missing")
            elif sizes[name] != size:
                problems.append(f"{name} has {sizes[name]} bytes, not {size}")
    return problems


def quarantine_incomplete(run_dir: str | Path | Storage) -> list[str]:
    """Rename the run's `checkpoint_*` folders that fail verification to `*.incomplete` (local or in
    storage); returns the new names."""
    run_dir = run_dir if isinstance(run_dir, Storage) else Storage(str(run_dir))
    moved = []
    for name in run_dir.list():
        if name.startswith("checkpoint_") and not name.endswith(".incomplete") and run_dir.is_dir(name):
            if verify_checkpoint(run_dir.child(name)):
                run_dir.move(name, name + ".incomplete")
                moved.append(name + ".incomplete")
    return moved
