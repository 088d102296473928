"""The storage level of PEC: committed checkpoint directories, their manifests, and which one can be restored.

A checkpoint directory holds one torch.distributed.checkpoint (DCP) save whose state dict is {ROOT: {key:
tensor or pickled object}} (runtime/pec.py's keys) and `pec.json`, the manifest. Invariants:
  - a directory is a checkpoint only once named `step-<N>` (committed by a rename, after DCP's `.metadata`
    and the manifest are in place); `.tmp-*` directories are unfinished writes, `.trash-*` half-deleted ones;
  - it is usable only when every byte its DCP metadata promises is on disk (`complete`);
  - the manifest names, per expert, the directory holding its newest version (`holders`); a checkpoint can be
    restored only when it and every holder it names are complete (`newest_restorable`).
Used by PECCheckpointer.restore() (runtime/checkpoint.py, runtime/recovery.py) and export_checkpoint().
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp

FORMAT = 1
MANIFEST = "pec.json"
ROOT = "pec"  # the DCP state dict is {ROOT: {key: tensor or object}}; DCP stores key as f"{ROOT}.{key}"


def committed(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("step-*") if p.is_dir()) if directory.exists() else []


def read_manifests(directory: Path, warn: bool) -> tuple[dict[str, dict], list[str]]:
    """(committed checkpoints' manifests by directory name, names of damaged ones); with `warn`, half-written
    `.tmp-*` directories are reported and removed."""
    manifests, damaged = {}, []
    for name in committed(directory):
        try:
            m = json.loads((directory / name / MANIFEST).read_text())
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r}")
            manifests[name] = m
        except (OSError, ValueError) as err:
            damaged.append(name)
            if warn:
                warnings.warn(f"PECCheckpointer: skipping damaged checkpoint {directory / name} ({err})")
    if warn:
        for tmp in directory.glob(".tmp-*"):
            warnings.warn(f"PECCheckpointer: removing {tmp}, a checkpoint whose write did not finish")
            remove(tmp)
        for trash in directory.glob(".trash-*"):
            shutil.rmtree(trash, ignore_errors=True)
    return manifests, damaged


def newest_restorable(directory: Path, manifests: dict[str, dict], bad: set[str]) -> str | None:
    """The newest checkpoint whose directories (its own and its experts' holders) are all complete and not in
    `bad`, or None; the ones passed over are warned about and added to `bad`."""
    for name in sorted(manifests, key=lambda n: manifests[n]["step"], reverse=True):
        m = manifests[name]
        dirs = {name} | {h for hs in m["holders"].values() for h in hs}
        unusable = sorted(d for d in dirs if d in bad or not complete(directory / d))
        if not unusable:
            return name
        warnings.warn(f"PECCheckpointer: skipping {name}: it needs {', '.join(unusable)}, missing or damaged")
        bad.update(d for d in unusable if d in manifests)
    return None


def saved_keys(path: Path) -> dict[str, object]:
    """The keys a checkpoint directory holds, with DCP's metadata of each (a tensor's has `size`)."""
    prefix = ROOT + "."
    return {k[len(prefix):]: v for k, v in dcp.FileSystemReader(path).read_metadata().state_dict_metadata.items()}


def complete(path: Path) -> bool:
    """Whether every byte DCP's metadata promises is on disk."""
    try:
        meta = dcp.FileSystemReader(path).read_metadata()
    except Exception:
        return False
    sizes = {}
    for info in meta.storage_data.values():
        f = path / info.relative_path
        if f not in sizes:
            sizes[f] = f.stat().st_size if f.exists() else -1
        if sizes[f] < info.offset + info.length:
            return False
    return True


def load(path: Path, state: dict) -> None:
    """Fill `state` ({key: tensor or BytesIO}) from one checkpoint directory, in this process alone."""
    with warnings.catch_warnings():  # DCP warns at every single-process load, even when asked for one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({ROOT: state}, storage_reader=dcp.FileSystemReader(path), no_dist=True)


def write_json(path: Path, obj) -> None:
    """Atomically: a reader sees the old file or the new one."""
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    """Rename out of the way first, so a crash midway never leaves a half-deleted checkpoint looking complete."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:6]}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
