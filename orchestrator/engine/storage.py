"""A run's `storage_path` as one filesystem, whatever it is: a local or NFS folder, or `s3://bucket/prefix`.

The driver and the workers may share no disk, so everything a worker needs from the driver travels
through storage: checkpoints (Ray Train writes those itself), the built dataset, a model prepared from a
local folder, and the metrics spooled while the tracking store is down. pyarrow's filesystems do the I/O;
S3 takes its endpoint, region and credentials from the standard AWS variables (AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE ...), as Ray Train does."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
MANIFEST = "orchestrator-manifest.json"  # a shipped folder's files and their sha256, written last


def is_uri(location: str) -> bool:
    return bool(_URI.match(location))


@dataclass(frozen=True)
class Storage:
    """A folder of a filesystem: `root` is a local path or a URI (s3://bucket/prefix, file:///path)."""

    root: str

    @cached_property
    def _fs_and_base(self):
        import pyarrow.fs as pafs

        if not is_uri(self.root):
            return pafs.LocalFileSystem(), str(Path(self.root).resolve())
        fs, base = pafs.FileSystem.from_uri(self.root)
        return fs, base.rstrip("/")

    @property
    def fs(self):
        return self._fs_and_base[0]

    @property
    def is_local(self) -> bool:
        """Whether paths in it are paths of this machine's filesystem (local disk or a mounted share)."""
        import pyarrow.fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root (a local path when `is_local`)."""
        return "/".join([self._fs_and_base[1], *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """`parts` under the root, in the form the root was given (a URI stays a URI)."""
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def child(self, *parts: str) -> Storage:
        return Storage(self.uri(*parts))

    # ---- files

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def size(self, *parts: str) -> int | None:
        info = self.fs.get_file_info(self.path(*parts))
        return info.size if info.is_file else None

    def read_bytes(self, *parts: str) -> bytes:
        if not self.exists(*parts):  # the same error on every filesystem
            raise FileNotFoundError(f"{self.uri(*parts)} does not exist")
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Replace the file whole: a reader sees the old content or the new one, never half of it (a local
        file is written beside and renamed; an S3 object is replaced by one PUT)."""
        path = self.path(*parts)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as out:
            out.write(data)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def delete(self, *parts: str) -> None:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def list(self, *parts: str) -> list[str]:
        """Names of the entries directly under `parts` (none when it does not exist)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def files(self, *parts: str) -> dict[str, int]:
        """Every file under `parts`, by path relative to it, with its size."""
        import pyarrow.fs as pafs

        base = self.path(*parts)
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path[len(base) + 1 :]: i.size for i in infos if i.is_file}

    def move(self, source: str, target: str) -> None:
        """Rename a file or folder under the root; on S3, which cannot rename a prefix, copy then delete."""
        import pyarrow.fs as pafs

        if self.is_local:
            os.replace(self.path(source), self.path(target))
            return
        if self.is_dir(source):
            self.fs.create_dir(self.path(target), recursive=True)
        pafs.copy_files(self.path(source), self.path(target), source_filesystem=self.fs,
                        destination_filesystem=self.fs)
        self.delete(source)

    # ---- folders shipped whole, checked by content

    def upload_folder(self, local: str | Path, *parts: str) -> str:
        """Copy a local folder under `parts` with a manifest of its files' sha256, written last; returns the
        folder's fingerprint (the manifest's own hash)."""
        import pyarrow.fs as pafs

        manifest = folder_manifest(local)
        if self.path(*parts) != str(Path(local).resolve()):
            self.fs.create_dir(self.path(*parts), recursive=True)  # copy_files makes subfolders, not the top
            pafs.copy_files(str(Path(local).resolve()), self.path(*parts), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        self.write_text(json.dumps(manifest, sort_keys=True), *parts, MANIFEST)
        return manifest_fingerprint(manifest)

    def download_folder(self, local: str | Path, *parts: str) -> Path:
        """Copy a shipped folder to `local` and check every file against its manifest."""
        import pyarrow.fs as pafs

        manifest = json.loads(self.read_text(*parts, MANIFEST))
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path(*parts), str(local.resolve()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        problems = folder_problems(local, manifest)
        if problems:
            raise OSError(f"{self.uri(*parts)} arrived damaged at {local}: {'; '.join(problems[:5])}")
        return local


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_manifest(folder: str | Path) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file in a local folder but a manifest."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def manifest_fingerprint(manifest: dict[str, dict]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def folder_problems(folder: Path, manifest: dict[str, dict]) -> list[str]:
    """What in a local folder differs from its manifest (missing files, other sizes or contents)."""
    problems = []
    for name, expected in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            problems.append(f"{name} differs from the original")
    return problems
