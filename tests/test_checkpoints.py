"""Checkpoint integrity checks, on folders laid out as Ray Train merges the ranks' files."""

import json

from orchestrator.engine.checkpoints import (
    STATE_FILE,
    previous_complete,
    quarantine_incomplete,
    verify_checkpoint,
    write_manifest,
)
from orchestrator.engine.storage import Storage
from orchestrator.runtime.driver import root_cause


def fake_checkpoint(folder, world_size=2):
    """Two ranks' files in one folder, each rank's manifest written after its own files."""
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"stage_index": 0, "step": 20, "world_size": world_size}))
    (folder / "ckpt").mkdir()
    (folder / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 100)
    write_manifest(folder, 0)
    rank1 = folder.parent.parent / "staging" / f"{folder.name}-rank1"  # rank 1's own temp folder
    (rank1 / "ckpt").mkdir(parents=True)
    (rank1 / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 50)
    write_manifest(rank1, 1)
    for path in rank1.rglob("*"):  # what Ray Train does: every rank's files into the one folder
        if path.is_file():
            target = folder / path.relative_to(rank1)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return folder


def test_a_complete_checkpoint_verifies(tmp_path):
    assert verify_checkpoint(fake_checkpoint(tmp_path / "checkpoint_1")) == []


def test_truncated_missing_and_unfinished_checkpoints_are_caught(tmp_path):
    truncated = fake_checkpoint(tmp_path / "checkpoint_a")
    (truncated / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"o" * 10)  # disk filled up
    assert verify_checkpoint(truncated) == ["ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt has 10 bytes, not 50"]
    missing = fake_checkpoint(tmp_path / "checkpoint_b")
    (missing / "ckpt" / "mp_rank_00_model_states.pt").unlink()
    assert verify_checkpoint(missing) == ["ckpt/mp_rank_00_model_states.pt is missing"]
    unfinished = fake_checkpoint(tmp_path / "checkpoint_c")
    (unfinished / "manifest-rank1.json").unlink()  # rank 1's upload never got to its manifest
    assert verify_checkpoint(unfinished) == ["rank 1's manifest is missing"]
    no_state = tmp_path / "checkpoint_d"
    no_state.mkdir()
    assert verify_checkpoint(no_state) == [f"{STATE_FILE} is missing"]


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_its_sha256_when_the_bytes_are_read(tmp_path):
    damaged = fake_checkpoint(tmp_path / "checkpoint_x")
    flip_a_byte(damaged / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # same size, other bytes
    assert verify_checkpoint(damaged) == []  # sizes alone (a listing: what quarantine checks in storage)
    assert verify_checkpoint(damaged, contents=True) == [
        "ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt differs from what was written (sha256 mismatch)"
    ]


def test_a_state_without_a_world_size_still_has_its_manifests_checked(tmp_path):
    folder = fake_checkpoint(tmp_path / "checkpoint_y")
    (folder / STATE_FILE).write_text(json.dumps({"stage_index": 0, "step": 20}))  # as written before world_size
    (folder / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"m" * 3)
    assert "ckpt/mp_rank_00_model_states.pt has 3 bytes, not 100" in verify_checkpoint(folder)


def test_a_damaged_latest_checkpoint_gives_way_to_the_newest_complete_one(tmp_path):
    run = tmp_path / "run"
    oldest = fake_checkpoint(run / "checkpoint_2026-01-01_10-00-00.000001")
    middle = fake_checkpoint(run / "checkpoint_2026-01-01_10-05-00.000001")
    latest = fake_checkpoint(run / "checkpoint_2026-01-01_10-10-00.000001")
    flip_a_byte(latest / "ckpt" / "mp_rank_00_model_states.pt")
    (run / "checkpoint_2026-01-01_10-15-00.000001.incomplete").mkdir()  # set aside earlier: never a candidate
    name, local = previous_complete(Storage(str(run)), latest.name, tmp_path / "restore")
    assert name == middle.name and verify_checkpoint(local, contents=True) == []
    flip_a_byte(middle / "ckpt" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # damaged too: the next one back
    assert previous_complete(Storage(str(run)), latest.name, tmp_path / "restore2")[0] == oldest.name
    flip_a_byte(oldest / "ckpt" / "mp_rank_00_model_states.pt")
    assert previous_complete(Storage(str(run)), latest.name, tmp_path / "restore3") is None


def test_checkpoints_from_before_manifests_are_accepted(tmp_path):
    legacy = tmp_path / "checkpoint_old"
    legacy.mkdir()
    (legacy / STATE_FILE).write_text(json.dumps({"stage_index": 0, "step": 50}))
    assert verify_checkpoint(legacy) == []


def test_incomplete_checkpoints_are_set_aside_not_deleted(tmp_path):
    good = fake_checkpoint(tmp_path / "run" / "checkpoint_1")
    bad = fake_checkpoint(tmp_path / "run" / "checkpoint_2")
    (bad / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"")
    moved = quarantine_incomplete(tmp_path / "run")
    assert moved == ["checkpoint_2.incomplete"]
    assert good.is_dir() and not bad.exists() and (tmp_path / "run" / "checkpoint_2.incomplete" / "ckpt").is_dir()
    assert quarantine_incomplete(tmp_path / "run") == []  # idempotent


def test_root_cause_finds_the_workers_error_inside_rays_wrapping():
    wrapped = RuntimeError(
        "Training failed due to worker errors:\n[Rank 0,1 Error Snippet]:\nTraceback (most recent call last):\n"
        '  File "x.py", line 3, in f\n'
        "OSError: [Errno 28] No space left on device: '/mnt/ckpt/checkpoint_2/ckpt/x.pt'\n"
    )
    assert root_cause(wrapped) == "OSError: [Errno 28] No space left on device: '/mnt/ckpt/checkpoint_2/ckpt/x.pt'"
    assert root_cause(ValueError("plain")) == "ValueError: plain"
