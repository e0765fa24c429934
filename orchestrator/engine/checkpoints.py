"""Checkpoint integrity: a checkpoint is complete only if every rank's manifest is there and every
file it lists has the recorded size.

Ray Train copies each rank's checkpoint files straight into the final `checkpoint_<time>` folder, so
a disk that fills up mid-copy leaves a folder that looks like a checkpoint. Ray does not register it
(the previous checkpoint stays the latest), but a restore must never trust one either: each rank
writes a manifest of its own files last, `verify_checkpoint` checks them, and after a failure
`quarantine_incomplete` renames half-written folders `*.incomplete` (nothing is deleted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def verify_checkpoint(folder: str | Path) -> list[str]:
    """What is wrong with a checkpoint folder; an empty list means it is complete."""
    folder = Path(folder)
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        return [f"{STATE_FILE} is missing"]
    try:
        state = json.loads(state_path.read_text())
        world_size = int(state["world_size"]) if "world_size" in state else None
    except (ValueError, TypeError, AttributeError) as exc:
        return [f"{STATE_FILE} is unreadable: {exc}"]
    if world_size is None:  # no world size recorded: no manifests to check the files against
        return []
    problems = []
    for rank in range(world_size):
        manifest = folder / f"{MANIFEST_PREFIX}{rank}.json"
        try:
            files = json.loads(manifest.read_text())["files"]
        except FileNotFoundError:
            problems.append(f"rank {rank}'s manifest is missing")
            continue
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"rank {rank}'s manifest is unreadable: {exc}")
            continue
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
            elif path.stat().st_size != size:
                problems.append(f"{name} has {path.stat().st_size} bytes, not {size}")
    return problems


def quarantine_incomplete(run_dir: str | Path) -> list[Path]:
    """Rename the run's `checkpoint_*` folders that fail verification to `*.incomplete`."""
    run_dir = Path(run_dir)
    moved = []
    for folder in sorted(run_dir.glob("checkpoint_*")):
        if folder.is_dir() and not folder.name.endswith(".incomplete") and verify_checkpoint(folder):
            target = folder.with_name(folder.name + ".incomplete")
            os.replace(folder, target)
            moved.append(target)
    return moved
