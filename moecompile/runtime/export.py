"""export_checkpoint(directory, model): a PEC checkpoint directory as a plain `state_dict` of the original model.

    model = MyMoE(config)                                  # the original, un-optimized model
    model.load_state_dict(moecompile.runtime.export_checkpoint("ckpts/", model))   # strict
    model.save_pretrained("out/")                          # a Hugging Face model: nothing moecompile left in it

What it returns: for every key of `model.state_dict()`, the newest complete checkpoint's tensor (the one
restore() would pick), each expert from the checkpoint holding its newest version, and stacked [E, ...] expert
parameters reassembled from their per-expert slices. Checkpoint keys name global experts, so the data- and
expert-parallel layout of the job that wrote it does not matter. Storage only: snapshots in memory belong to a
running job (restore() uses them).

Refused with a ValueError naming the cause: a checkpoint written from a model whose architecture moecompile
changed (shortcut="scmoe"/"dgmoe": extra parameters, or the same ones computing something else); a model
whose keys or shapes do not match the checkpoint (each difference named).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from moecompile.runtime import storage


def export_checkpoint(directory, model: nn.Module) -> dict[str, torch.Tensor]:
    """The newest complete checkpoint in `directory` as `model`'s state_dict (see the module docstring)."""
    directory = Path(directory)
    manifests, damaged = storage.read_manifests(directory, warn=False)
    with warnings.catch_warnings():  # a damaged newest checkpoint is passed over, as restore() does
        warnings.simplefilter("ignore")
        name = storage.newest_restorable(directory, manifests, set(damaged))
    if name is None:
        raise ValueError(f"export_checkpoint: no complete PEC checkpoint in {directory}")
    m = manifests[name]
    shortcut = m.get("layout", {}).get("shortcut")
    if shortcut:
        raise ValueError(f"export_checkpoint: {directory / name} was written by a model optimized with "
                         f"shortcut={shortcut!r}, which changes the architecture (the MoE blocks route on a "
                         "shortcut and add parameters): its weights do not fit the original model. Restore it into "
                         f"moecompile.optimize(model, shortcut={shortcut!r}) with PECCheckpointer.restore() instead")
    # a key's newest version is in the newest of these directories holding it: a newer directory holding an
    # expert would be that expert's holder
    dirs = sorted({name, *(h for hs in m["holders"].values() for h in hs)}, key=lambda d: -int(d.split("-")[1]))
    keys_in = {d: storage.saved_keys(directory / d) for d in dirs}

    def newest(key: str) -> str | None:
        return next((d for d in dirs if key in keys_in[d]), None)

    wanted, pieces, missing = {}, {}, []
    for fqn in model.state_dict():
        key = f"model/{fqn}"
        slices = [key] if newest(key) else [f"{key}[{e}]" for e in range(_experts(key, newest))]
        if not slices:
            missing.append(fqn)
        for k in slices:
            meta = keys_in[newest(k)][k]
            wanted.setdefault(newest(k), {})[k] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        pieces[fqn] = slices
    for d, part in wanted.items():
        storage.load(directory / d, part)
    loaded = {k: v for part in wanted.values() for k, v in part.items()}
    out, mismatched = {}, []
    for fqn, t in model.state_dict().items():
        if fqn in missing:
            continue
        slices = pieces[fqn]
        out[fqn] = loaded[slices[0]] if slices == [f"model/{fqn}"] else torch.stack([loaded[k] for k in slices])
        if out[fqn].shape != t.shape:
            mismatched.append(f"{fqn}: checkpoint {list(out[fqn].shape)}, model {list(t.shape)}")
    known = {f"model/{fqn}" for fqn in out} | {f"model/{fqn}" for fqn in missing}
    extra = sorted({k.split("[")[0] for d in dirs for k in keys_in[d] if k.startswith("model/")} - known)
    if missing or mismatched or extra:
        parts = [f"missing in the checkpoint: {', '.join(missing[:5])}" if missing else "",
                 f"shapes differ: {'; '.join(mismatched[:5])}" if mismatched else "",
                 f"not in the model: {', '.join(k[len('model/'):] for k in extra[:5])}" if extra else ""]
        raise ValueError(f"export_checkpoint: {directory / name} does not fit {type(model).__name__} ("
                         + "; ".join(p for p in parts if p) + "); pass the original model the checkpoint was "
                         "trained from")
    return out


def _experts(key: str, newest) -> int:
    """How many per-expert slices `key[0]`, `key[1]`, ... the checkpoints hold (0: not a stacked expert key)."""
    e = 0
    while newest(f"{key}[{e}]") is not None:
        e += 1
    return e
