"""The converted-model cache: folders that are built once (a GGUF de-quantised to an fp32 HF
folder), checked on every load, and rebuilt when broken.

* ``ensure_built(folder, build)`` returns ``folder`` once it holds a complete, verified build.
  ``build(tmp)`` writes the files into a fresh temporary sibling ``<name>.tmp-*``; a manifest
  (``emocircuits-cache.json``: size and sha256 of every file) is written beside them and the
  folder is renamed into place, so a folder either is complete or does not exist.
* On each call the folder is checked against its manifest (every file present, same size,
  same sha256: about 0.5 s per GB); a missing manifest (a folder from an older version or an
  interrupted copy), a truncated, missing or altered file is reported by a
  ``CacheRebuildWarning`` naming the folder and the file, and the folder is rebuilt.
* Conversions of one folder are serialised by an OS lock (``<name>.lock``, released by the OS
  when a process dies); under the lock, temporary folders left by a killed conversion of this
  folder are removed. Other folders' temporaries are never touched.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "emocircuits-cache.json"
MANIFEST_VERSION = 1


class CacheRebuildWarning(UserWarning):
    """A cached model folder was broken (named in the message) and is being rebuilt."""


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def write_manifest(folder: Path, source: dict | None = None) -> Path:
    """Record size and sha256 of every file under ``folder`` (the manifest itself excluded)."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    doc = {"version": MANIFEST_VERSION, "source": source or {}, "files": files}
    out = folder / MANIFEST
    out.write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    return out


def verify(folder: Path) -> str | None:
    """None if ``folder`` matches its manifest, else what is wrong (naming the file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    man = folder / MANIFEST
    if not man.is_file():
        return f"{man} is missing (an interrupted or older conversion)"
    try:
        doc = json.loads(man.read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("version") != MANIFEST_VERSION or not isinstance(files, dict) or not files:
            raise ValueError("unexpected layout")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{man} is unreadable ({type(e).__name__}: {e})"
    for rel, want in files.items():
        p = folder / rel
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != want.get("bytes"):
            return f"{p} has {size} bytes, the manifest says {want.get('bytes')} (truncated or replaced)"
        if sha256_file(p) != want.get("sha256"):
            return f"{p} does not match its sha256 in {man.name} (corrupt or altered)"
    return None


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder.parent / f"{folder.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a conversion in progress in another process
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporary build folders of ``folder`` (``<name>.tmp-*``) lying beside it."""
    return sorted(p for p in folder.parent.glob(f"{folder.name}.tmp-*") if p.is_dir())


def ensure_built(folder: str | os.PathLike, build: Callable[[Path], None], *,
                 source: dict | None = None, rebuild: bool = False) -> Path:
    """``folder``, verified; built (or rebuilt, with a ``CacheRebuildWarning``) by ``build(tmp)``
    when absent, broken or ``rebuild`` is set. Atomic: the complete build is renamed into place."""
    folder = Path(folder)
    problem = None if rebuild else verify(folder)
    if problem is None and not rebuild:
        return folder
    with _lock(folder):
        for t in stale_temporaries(folder):  # a killed conversion of this folder (we hold its lock)
            shutil.rmtree(t, ignore_errors=True)
        problem = "a rebuild was asked" if rebuild else verify(folder)
        if problem is None:  # another process built it while we waited for the lock
            return folder
        if folder.exists():
            warnings.warn(f"model cache: {problem}; rebuilding {folder}", CacheRebuildWarning, stacklevel=3)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
        try:
            build(tmp)
            if not any(tmp.iterdir()):
                raise RuntimeError(f"building {folder}: the build wrote no files")
            write_manifest(tmp, source)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder
