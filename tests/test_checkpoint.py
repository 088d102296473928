"""PECCheckpointer in one process: what a checkpoint holds, which experts, the index and garbage collection, and
that restore() rebuilds exactly the state the checkpoints hold, or refuses with a clear error.

Training data is a function of the step, so a test can replay steps; `_snap` records the whole training state
(every key of runtime/pec.py's map, cloned) whenever a checkpoint is taken, which is what restores must equal.
"""
import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime import pec
from moecompile.runtime.checkpoint import PECCheckpointer, PLTExceeded
from tests.zoo import EinsumBank, Net

E = 8


def _gpt(seed=0):
    torch.manual_seed(seed)
    model = gpt_moe(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16, num_experts=E)
    fast = moecompile.optimize(model, (_batch(0)[0],))
    return fast, torch.optim.AdamW(fast.parameters(), lr=1e-2, weight_decay=0.1)


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, 256, (2, 17), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _train_step(fast, opt, step):
    x, y = _batch(step)
    fast(x, y)[1].backward()
    opt.step()
    opt.zero_grad()


def _state(ckpt):
    return {e.key: e.get().detach().clone() for e in ckpt.state.entries()}


def _run(directory, steps, every=2, start=0, build=_gpt, snaps=None, keep_snapshots=False, **kw):
    """Train steps [start, steps) with a checkpointer; returns it (closed, its memory snapshots removed unless
    `keep_snapshots`). `snaps[step]` gets the state at each checkpoint."""
    fast, opt = build()
    ckpt = PECCheckpointer(fast, opt, directory, every=every, **kw)
    assert ckpt.restore() == start
    for step in range(start, steps):
        _train_step(fast, opt, step)
        if ckpt.step(step) and snaps is not None:
            snaps[step] = _state(ckpt)
    ckpt.close(keep_snapshots=keep_snapshots)
    return ckpt


def _restored(directory, **kw):
    fast, opt = _gpt(seed=123)  # other initial weights: everything must come from the checkpoint
    ckpt = PECCheckpointer(fast, opt, directory, **kw)
    return ckpt, ckpt.restore()


def _manifest(directory, name):
    return json.loads((directory / name / "pec.json").read_text())


def test_full_checkpoint_equals_plain_dcp_save(tmp_path):
    """K = E saves exactly the state a plain full DCP save holds: every model and optimizer tensor, stacked
    expert parameters reassembled from their per-expert slices."""
    torch.manual_seed(0)
    model = Net(EinsumBank(e=4))
    fast = moecompile.optimize(model, (torch.randn(2, 5, 32),))
    opt = torch.optim.Adam(fast.parameters(), lr=1e-2)
    ckpt = PECCheckpointer(fast, opt, tmp_path / "pec", every=1, experts_per_ckpt=4)
    ckpt.restore()
    for step in range(3):
        fast(torch.randn(2, 5, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step(step)
    ckpt.close()
    plain = {"model": fast.state_dict(), "optim": get_optimizer_state_dict(fast, opt)}
    dcp.save(plain, checkpoint_id=tmp_path / "plain", no_dist=True)

    full = {"model": {k: torch.empty_like(v) for k, v in plain["model"].items()},
            "optim": {"state": {n: {k: torch.empty_like(v) for k, v in s.items()}
                                for n, s in plain["optim"]["state"].items()}}}
    dcp.load(full, checkpoint_id=tmp_path / "plain", no_dist=True)
    saved_keys = {k: v for k, v in dcp.FileSystemReader(tmp_path / "pec" / "step-00000002").read_metadata()
                  .state_dict_metadata.items() if k.startswith("pec.model/") or k.startswith("pec.optim/")}
    pieces = {k[len("pec."):]: torch.empty(v.size, dtype=v.properties.dtype) for k, v in saved_keys.items()
              if hasattr(v, "size")}
    dcp.load({"pec": pieces}, checkpoint_id=tmp_path / "pec" / "step-00000002", no_dist=True)

    def joined(prefix, fqn, suffix=""):
        if f"{prefix}{fqn}{suffix}" in pieces:
            return pieces[f"{prefix}{fqn}{suffix}"]
        return torch.stack([pieces[f"{prefix}{fqn}[{e}]{suffix}"] for e in range(4)])
    for fqn, want in full["model"].items():
        assert torch.equal(joined("model/", fqn), want), fqn
    for fqn, state in full["optim"]["state"].items():
        for name, want in state.items():
            assert torch.equal(joined("optim/", fqn, f"/{name}"), want), (fqn, name)
    expert_slices = [k for k in pieces if "[" in k]
    assert expert_slices and len(pieces) == len(expert_slices) + sum(1 for k in pieces if "[" not in k)
    assert sum(t.nbytes for t in pieces.values()) == (
        sum(t.nbytes for t in full["model"].values())
        + sum(t.nbytes for s in full["optim"]["state"].values() for t in s.values()))


def test_sequential_saves_k_experts_and_covers_all(tmp_path):
    ckpt = _run(tmp_path, steps=12, every=2, experts_per_ckpt=3)
    first, *rest = [h.experts for h in ckpt.history]
    assert all(v == list(range(E)) for v in first.values()), "the first checkpoint saves every expert"
    for experts in rest:
        assert all(len(v) == 3 for v in experts.values())
    for layer in first:
        assert set().union(*(set(r[layer]) for r in rest[:3])) == set(range(E)), "⌈8/3⌉ checkpoints cover all"
    # the layers start apart, so one checkpoint's experts do not all sit on the same expert-parallel rank
    assert rest[0]["blocks.1.ffn"] != rest[0]["blocks.3.ffn"]


def test_load_aware_picks_most_tokens_since_save():
    unsaved = {"a": [5, 9, 0, 9], "b": [1, 1, 1, 1]}
    age = {"a": [0, 3, 0, 1], "b": [4, 2, 3, 2]}
    assert pec.load_aware(unsaved, age, 2) == {"a": [1, 3], "b": [1, 3]}
    assert pec.sequential(3, {"a": 4, "b": 4}, 1) == {"a": [3], "b": [1]}


def test_load_aware_follows_counted_tokens(tmp_path):
    ckpt = _run(tmp_path, steps=8, every=2, experts_per_ckpt=2, selection="load_aware")
    for h, m in zip(ckpt.history[1:], [_manifest(tmp_path, f"step-{s.step:08d}") for s in ckpt.history[1:]]):
        assert all(len(v) == 2 for v in h.experts.values())
    last = _manifest(tmp_path, "step-00000007")
    for layer, saved in last["saved"].items():
        prev = _manifest(tmp_path, "step-00000005")
        unsaved = [c - s[0] for c, s in zip(last["cumulative"][layer], prev["saved_at"][layer])]
        assert min(unsaved[e] for e in saved) >= max(u for e, u in enumerate(unsaved) if e not in saved)
    assert sum(sum(v) for v in last["cumulative"].values()) == 8 * 2 * 16 * 2 * 2  # steps·tokens·k·layers


def test_restore_is_bit_equal_to_what_the_checkpoints_hold(tmp_path):
    snaps = {}
    _run(tmp_path, steps=11, every=2, experts_per_ckpt=1, snaps=snaps)
    m = _manifest(tmp_path, "step-00000009")
    ckpt, start = _restored(tmp_path, every=2)
    assert start == 10
    got = _state(ckpt)
    assert got.keys() == snaps[9].keys()
    holder_of = {(e.layer, e.expert): int(m["holders"][e.layer][e.expert].split("-")[1])
                 for e in ckpt.state.entries() if e.layer is not None}
    older = 0
    for e in ckpt.state.entries():
        step = holder_of[(e.layer, e.expert)] if e.layer is not None else 9
        older += step != 9
        assert torch.equal(got[e.key], snaps[step][e.key]), (e.key, step)
    assert older > 0, "with K=1 most experts come from older checkpoints"
    report = ckpt.last_restore
    assert report.step == 9 and 0 < report.plt < 1 and report.plt_total == report.plt
    assert {int(k) for k in report.older_experts["blocks.1.ffn"]} == set(range(E)) - set(m["saved"]["blocks.1.ffn"])


def test_restore_also_restores_rng_settings_and_stateful(tmp_path):
    fast, opt = _gpt()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ckpt = PECCheckpointer(fast, opt, tmp_path, every=1, stateful={"sched": sched})
    ckpt.restore()
    _train_step(fast, opt, 0)
    sched.step()
    ckpt.step(0)
    ckpt.close()
    after = torch.rand(3)
    torch.rand(5)
    fast, opt = _gpt(seed=5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ckpt = PECCheckpointer(fast, opt, tmp_path, every=1, stateful={"sched": sched})
    assert ckpt.restore() == 1
    assert torch.equal(torch.rand(3), after), "the RNG continues where the checkpoint left it"
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3) and sched.last_epoch == 1


def test_resumed_training_with_full_checkpoints_matches_uninterrupted(tmp_path):
    _run(tmp_path / "a", steps=6, every=2, experts_per_ckpt=E)
    stopped = _run(tmp_path / "b", steps=4, every=2, experts_per_ckpt=E)
    resumed = _run(tmp_path / "b", steps=6, every=2, start=4, experts_per_ckpt=E)
    straight = _restored(tmp_path / "a", every=2)[0]
    assert stopped.history and resumed.history
    again = _restored(tmp_path / "b", every=2)[0]
    a, b = _state(straight), _state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_garbage_collection_keeps_every_needed_version(tmp_path):
    _run(tmp_path, steps=40, every=2, experts_per_ckpt=2, keep=1)
    names = sorted(p.name for p in tmp_path.glob("step-*"))
    manifests = {n: _manifest(tmp_path, n) for n in names}
    newest = manifests[names[-1]]
    holders = {h for hs in newest["holders"].values() for h in hs}
    assert set(names) == holders | {names[-1]}, "only the newest and the homes of newest expert versions remain"
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["newest"] == names[-1] and index["holders"] == newest["holders"]
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))


def test_damaged_or_half_written_checkpoints_are_skipped(tmp_path):
    snaps = {}
    _run(tmp_path, steps=10, every=2, experts_per_ckpt=E, snaps=snaps)
    newest = tmp_path / "step-00000009"
    data = newest / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)  # a torn write
    shutil.copytree(tmp_path / "step-00000007", tmp_path / ".tmp-step-00000011-deadbeef")  # an unfinished one
    with pytest.warns(UserWarning) as caught:
        ckpt, start = _restored(tmp_path, every=2)
    text = " ".join(str(w.message) for w in caught)
    assert "step-00000009" in text and ".tmp-step-00000011" in text
    assert start == 8
    got = _state(ckpt)
    assert all(torch.equal(got[k], snaps[7][k]) for k in got)
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_metadata_means_not_a_checkpoint(tmp_path):
    _run(tmp_path, steps=6, every=2, experts_per_ckpt=E)
    (tmp_path / "step-00000005" / ".metadata").unlink()
    with pytest.warns(UserWarning, match="step-00000005"):
        assert _restored(tmp_path, every=2)[1] == 4


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
    _run(tmp_path, steps=2, every=2)
    torch.manual_seed(0)
    other = gpt_moe(n_layer=4, d_model=48, d_ff=64, n_head=2, max_seq=16, num_experts=E)
    fast = moecompile.optimize(other, (_batch(0)[0],))
    ckpt = PECCheckpointer(fast, torch.optim.AdamW(fast.parameters()), tmp_path)
    with pytest.raises(ValueError, match="another model"):
        ckpt.restore()


def test_refuses_above_max_plt(tmp_path):
    _run(tmp_path, steps=10, every=2, experts_per_ckpt=1)
    fast, opt = _gpt()
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    with pytest.raises(PLTExceeded, match="max_plt"):
        PECCheckpointer(fast, opt, tmp_path, max_plt=0.01).restore()
    assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items()), "nothing loaded"
    _, start = _restored(tmp_path, max_plt=0.99)
    assert start == 10


def test_training_into_a_used_directory_without_restore_is_refused(tmp_path):
    _run(tmp_path, steps=2, every=2)
    fast, opt = _gpt()
    ckpt = PECCheckpointer(fast, opt, tmp_path, every=1)
    _train_step(fast, opt, 0)
    with pytest.raises(RuntimeError, match="restore"):
        ckpt.step(0)


def test_bad_arguments():
    fast, opt = _gpt()
    for kw in ({"every": 0}, {"experts_per_ckpt": 0}, {"selection": "random"}, {"keep": 0}):
        with pytest.raises(ValueError):
            PECCheckpointer(fast, opt, "unused", **kw)
    with pytest.raises(TypeError, match="moecompile.optimize"):
        PECCheckpointer(gpt_moe(), opt, "unused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lazy = moecompile.optimize(gpt_moe())
    with pytest.raises(ValueError, match="example_inputs"):
        PECCheckpointer(lazy, opt, "unused")


def test_a_failed_write_is_raised_and_its_experts_saved_again(tmp_path, monkeypatch):
    fast, opt = _gpt()
    ckpt = PECCheckpointer(fast, opt, tmp_path, every=1, experts_per_ckpt=1)
    ckpt.restore()
    _train_step(fast, opt, 0)
    ckpt.step(0)
    ckpt.wait()

    def disk_full(self, plan, planner):
        raise OSError("No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(dcp.FileSystemWriter, "write_data", disk_full)
        _train_step(fast, opt, 1)
        ckpt.step(1)
        with pytest.raises(RuntimeError, match="writing step-00000001 failed(.|\n)*No space left"):
            ckpt.wait()
    assert not (tmp_path / "step-00000001").exists()
    _train_step(fast, opt, 2)
    ckpt.step(2)
    ckpt.close()
    assert ckpt.history[-1].experts == ckpt.history[0].experts, "the lost experts' next save: all of them, as at first"
    snap = _state(ckpt)
    restored, start = _restored(tmp_path)
    assert start == 3
    got = _state(restored)
    assert all(torch.equal(got[k], snap[k]) for k in snap)
