"""Model references as mergekit writes them, resolved to local folders without any network access.

A reference is ``MODEL[@REVISION][+LORA[@REVISION]]`` (mergekit's ``ModelReference``: ``+`` separates a
LoRA adapter applied to the model before merging, ``@`` a hub revision). Each part is

* a local folder when one exists at that path (``~`` expanded; a revision is then refused: a folder has
  none), else
* a Hugging Face hub id ``org/name``, looked up in the local hub cache as ``huggingface_hub`` lays it
  out: ``<cache>/models--org--name/refs/<revision>`` holds a commit hash and
  ``snapshots/<hash>/`` the files; a revision that is itself a commit hash names its snapshot folder
  directly. The revision defaults to ``main``. The cache is ``$HF_HUB_CACHE`` (or the older
  ``$HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
  ``~/.cache/huggingface/hub`` -- the folders ``huggingface_hub`` itself uses, read from the
  environment at call time.

Nothing is downloaded: a merge runs offline, so a model missing from the cache is one error naming the
id and the cache folder searched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mllm.merge.tensors import MergeError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelRef:
    """One parsed reference: the model folder, and the LoRA adapter folder applied to it (if any)."""

    text: str  # as written in the YAML (the model id used in plans and messages)
    path: Path
    lora: Path | None = None


def hub_cache() -> Path:
    """The local Hugging Face hub cache folder, from the environment as ``huggingface_hub`` reads it."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def resolve_path(text: str, where: str) -> Path:
    """``PATH`` or ``ORG/NAME[@REV]`` -> a local folder (not checked further when it is a local path)."""
    name, _, rev = text.partition("@")
    if "@" in rev:
        raise MergeError(f"{where}: {text!r}: more than one '@' (expected MODEL[@REVISION])")
    local = Path(name).expanduser()
    if local.exists() or not _HUB_ID.fullmatch(name):
        if rev:
            raise MergeError(f"{where}: {text!r}: a revision (@{rev}) needs a hub id org/name, "
                             f"and {name!r} is a local path")
        return local
    cache = hub_cache()
    repo = cache / f"models--{name.replace('/', '--')}"
    rev = rev or "main"
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev if _COMMIT.fullmatch(rev) else None
    snapshot = repo / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise MergeError(f"{where}: {text!r} is not a local folder, and revision {rev!r} of hub model {name!r} "
                         f"is not in the Hugging Face cache {repo} (no download at merge time: fetch it first, "
                         f"e.g. `huggingface-cli download {name} --revision {rev}`)")
    return snapshot


def parse_ref(text: str, where: str) -> ModelRef:
    """``MODEL[@REV][+LORA[@REV]]`` -> :class:`ModelRef` (mergekit splits on ``+`` first, then ``@``)."""
    parts = text.split("+")
    if len(parts) > 2 or not all(parts):
        raise MergeError(f"{where}: {text!r}: expected MODEL or MODEL+LORA_ADAPTER (one '+')")
    lora = resolve_path(parts[1], where) if len(parts) == 2 else None
    return ModelRef(text, resolve_path(parts[0], where), lora)
