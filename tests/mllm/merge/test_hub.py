"""Hub ids (org/name[@revision]) resolve offline to snapshots of a local cache laid out as huggingface_hub's."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from mllm.merge import MergeError, load_plan, run_merge
from mllm.merge.hub import hub_cache, parse_ref

COMMIT_MAIN = "a" * 40
COMMIT_V1 = "0123456789abcdef0123456789abcdef01234567"


def _fake_repo(cache: Path, repo_id: str, snapshots: dict[str, Path], refs: dict[str, str]) -> Path:
    """models--org--name/{refs/<ref>, snapshots/<commit>/<file> -> ../../blobs/<id>} as huggingface_hub writes it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    for commit, src in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in src.iterdir():
            blob = repo / "blobs" / f"{commit[:8]}-{f.name}"
            shutil.copy2(f, blob)
            os.symlink(os.path.relpath(blob, snap), snap / f.name)
    for ref, commit in refs.items():
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return repo


@pytest.fixture
def cache(tmp_path: Path, llamas, monkeypatch) -> Path:
    root = tmp_path / "hf_cache"
    _fake_repo(root, "org/tiny", {COMMIT_MAIN: llamas["a"], COMMIT_V1: llamas["b"]}, {"main": COMMIT_MAIN, "v1": COMMIT_V1})
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


def test_hub_ids_resolve_to_cached_snapshots(cache: Path) -> None:
    snaps = cache / "models--org--tiny" / "snapshots"
    assert parse_ref("org/tiny", "m.yaml").path == snaps / COMMIT_MAIN  # revision main by default
    assert parse_ref("org/tiny@main", "m.yaml").path == snaps / COMMIT_MAIN
    assert parse_ref("org/tiny@v1", "m.yaml").path == snaps / COMMIT_V1  # a ref
    assert parse_ref(f"org/tiny@{COMMIT_V1}", "m.yaml").path == snaps / COMMIT_V1  # a commit hash
    ref = parse_ref("org/tiny@v1+org/tiny", "m.yaml")  # a LoRA part resolves alike
    assert (ref.path, ref.lora) == (snaps / COMMIT_V1, snaps / COMMIT_MAIN)


def test_merge_of_hub_ids_equals_merge_of_their_folders(tmp_path: Path, ckpt, llamas, cache: Path) -> None:
    def cfg(a: str, b: str) -> dict:
        return {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.3}},
                                                     {"model": b, "parameters": {"weight": 0.7}}]}

    hub = run_merge(ckpt.write_yaml(tmp_path / "hub.yaml", cfg("org/tiny", "org/tiny@v1")), tmp_path / "hub")
    local = run_merge(ckpt.write_yaml(tmp_path / "local.yaml", cfg(str(llamas["a"]), str(llamas["b"]))),
                      tmp_path / "local")
    x, y = ckpt.state_of(hub), ckpt.state_of(local)
    assert sorted(x) == sorted(y) and all(torch.equal(x[n], y[n]) for n in x)


def test_missing_hub_model_is_one_line_naming_id_and_cache(tmp_path: Path, ckpt, llamas, cache: Path) -> None:
    path = ckpt.write_yaml(tmp_path / "m.yaml", {"merge_method": "linear", "models": [
        {"model": str(llamas["a"]), "parameters": {"weight": 1.0}},
        {"model": "org/absent@v2", "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeError) as err:
        load_plan(path)
    assert str(err.value) == (
        f"{path}: models[1].model: 'org/absent@v2' is not a local folder, and revision 'v2' of hub model "
        f"'org/absent' is not in the Hugging Face cache {cache / 'models--org--absent'} (no download at merge "
        f"time: fetch it first, e.g. `huggingface-cli download org/absent --revision v2`)")
    with pytest.raises(MergeError, match=r"revision 'v9' of hub model 'org/tiny' is not in the Hugging Face cache"):
        parse_ref("org/tiny@v9", "m.yaml")
    with pytest.raises(MergeError, match=r"a revision \(@main\) needs a hub id org/name, and .* is a local path"):
        parse_ref(f"{llamas['a']}@main", "m.yaml")


def test_cache_folder_follows_huggingface_hub_environment(tmp_path: Path, monkeypatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub_cache() == tmp_path / "hub"
