"""Atomic writes: a file or a folder appears whole under its final name, or not at all.

Every writer of the project (configs, eval JSONL and metrics, probe results, saved models, merged
models, LLaVA exports) goes through these two helpers, so a crash or a full disk never leaves half a
file or a half-filled folder under a name a reader trusts. They live on floor 0 (``common/``, which
imports nothing of ours) because floors that may not import each other both need them: ``train/``
(ShapesWorld exports), ``eval/`` (predictions, metrics), ``mllm/`` (configs, checkpoints) and
``mllm/merge/`` (merged folders, probe results) -- and merging, being training-free, never imports
``train/``. One copy here replaces the per-floor copies that drifted apart.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to a temp file beside ``path``, flush it to disk, rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(target: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a hidden temp folder beside ``target``; on success rename it to ``target``.

    On any exception the temp folder is removed and ``target`` is untouched. An existing ``target``
    is an error unless ``replace``; then the old folder is moved aside first (two renames) and
    deleted only after the new one is in place, so the data already written is never lost.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target}: already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old / target.name)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
