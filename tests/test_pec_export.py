"""Checkpoints that leave the job: export_checkpoint() gives the original model's state_dict (strict load, then
Hugging Face save_pretrained/from_pretrained), from checkpoints written under any expert-parallel size; restore()
across expert-parallel sizes (ep=1 -> 2 -> 4 -> 2 (dp=2) and back to one process), tensor by tensor; a
checkpoint of a shortcut-rewritten model, or of another model, is refused with a clear message.
"""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.models import gpt_moe
from moecompile.runtime import export_checkpoint
from moecompile.runtime.checkpoint import PECCheckpointer
from moecompile.runtime.expert_parallel import reduce_gradients
from moecompile.runtime.spawn import run_ranks
from tests import hf_zoo
from tests.helpers import run_jobs
from tests.pec_worker import batch, state
from tests.test_checkpoint import _gpt, _train_step

SMALL = dict(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16)


def test_export_is_the_restored_state_in_the_original_layout(tmp_path):
    fast, opt = _gpt()
    ckpt = PECCheckpointer(fast, opt, tmp_path, every=2, experts_per_ckpt=1, snapshot_dir=None)
    ckpt.restore()
    for step in range(9):
        _train_step(fast, opt, step)
        ckpt.step(step)
    ckpt.close()
    original = gpt_moe(n_layer=4, d_model=32, d_ff=64, n_head=2, max_seq=16, num_experts=8)
    original.load_state_dict(export_checkpoint(tmp_path, original), strict=True)
    restored, opt = _gpt(seed=5)
    PECCheckpointer(restored, opt, tmp_path, snapshot_dir=None).restore()
    want = restored.state_dict()
    assert original.state_dict().keys() == want.keys()
    assert all(torch.equal(t, want[k]) for k, t in original.state_dict().items())


def test_export_refuses_a_shortcut_rewrite_or_another_model(tmp_path):
    torch.manual_seed(0)
    model = gpt_moe(**SMALL)
    fast = moecompile.optimize(model, (batch(0, 0)[0],), shortcut="scmoe")
    ckpt = PECCheckpointer(fast, torch.optim.AdamW(fast.parameters()), tmp_path / "sc", every=1, snapshot_dir=None)
    ckpt.restore()
    ckpt.save(0)
    ckpt.close()
    with pytest.raises(ValueError, match="shortcut='scmoe'.*changes the architecture"):
        export_checkpoint(tmp_path / "sc", model)
    fast, opt = _gpt()
    with PECCheckpointer(fast, opt, tmp_path / "plain", every=1, snapshot_dir=None) as ckpt:
        ckpt.restore()
        ckpt.save(0)
    with pytest.raises(ValueError, match="does not fit.*shapes differ"):
        export_checkpoint(tmp_path / "plain", gpt_moe(**{**SMALL, "d_ff": 48}))
    with pytest.raises(ValueError, match="no complete PEC checkpoint"):
        export_checkpoint(tmp_path / "empty", model)


def _ep_job(rank, ws, restore_from, save_to, dp):
    """Expert parallel over ws / dp ranks (dp data-parallel replicas): restore `restore_from`, record the state,
    train 2 steps, save a full checkpoint into `save_to`; → (state after restore, state saved)."""
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dp, ws // dp), mesh_dim_names=("dp", "ep"))
    fast = moecompile.optimize(gpt_moe(**SMALL), (batch(0, 0)[0],), mesh=mesh)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    ckpt = PECCheckpointer(fast, opt, restore_from, every=1, experts_per_ckpt=8, snapshot_dir=None)
    assert ckpt.restore() > 0
    restored = state(ckpt)
    ckpt.close()
    ckpt = PECCheckpointer(fast, opt, save_to, every=1, experts_per_ckpt=8, snapshot_dir=None) if save_to else None
    if ckpt is not None:
        ckpt.restore()
        for step in range(2):
            x, y = batch(step, rank)
            fast(x, y)[1].backward()
            reduce_gradients(fast, mesh)
            opt.step()
            opt.zero_grad()
            ckpt.step(step)
        ckpt.close()
    dist.barrier()
    return restored, state(ckpt) if ckpt else None


def _same(got: dict, want: dict):
    assert got and set(got) <= set(want)
    for key, value in got.items():
        assert torch.equal(value, want[key]), key


def test_restore_across_expert_parallel_sizes(tmp_path):
    d1, d2, d4 = tmp_path / "ep1", tmp_path / "ep2", tmp_path / "ep4"
    fast, opt = _gpt()  # ep=1: one process
    with PECCheckpointer(fast, opt, d1, every=1, experts_per_ckpt=8, snapshot_dir=None) as ckpt:
        ckpt.restore()
        for step in range(2):
            _train_step(fast, opt, step)
            ckpt.step(step)
        written1 = state(ckpt)
    ep2 = run_ranks(_ep_job, 2, d1, d2, 1)                                     # ep=1 -> ep=2, writes ep=2
    for restored, _ in ep2:
        _same(restored, written1)
    written2 = {k: v for _, saved in ep2 for k, v in saved.items()}
    assert len(written2) > max(len(saved) for _, saved in ep2), "each rank held part of the experts"
    # one spawn of 4 ranks for both 4-rank jobs, in turn (_ep_job ends once every rank wrote): ~9 s less
    four = run_ranks(run_jobs, 4, {"ep4": (_ep_job, d2, d4, 1),                 # ep=2 -> ep=4, writes ep=4
                                   "dp2xep2": (_ep_job, d4, None, 2)})          # ep=4 -> ep=2 (x dp=2)
    ep4 = [r["ep4"] for r in four]
    for restored, _ in ep4:
        _same(restored, written2)
    written4 = {k: v for _, saved in ep4 for k, v in saved.items()}
    for restored, _ in (r["dp2xep2"] for r in four):
        _same(restored, written4)
    for directory, written in ((d2, written2), (d4, written4)):                # ep=2, ep=4 -> one process
        fast, opt = _gpt(seed=9)
        ckpt = PECCheckpointer(fast, opt, directory, snapshot_dir=None)
        ckpt.restore()
        _same(state(ckpt), written)
        assert state(ckpt).keys() == written.keys(), "one process holds every expert"
        original = gpt_moe(**SMALL)
        exported = export_checkpoint(directory, original)
        original.load_state_dict(exported, strict=True)
        _same({f"model/{k}": v for k, v in exported.items()}, written)


def _hf_job(rank, ws, directory):
    torch.manual_seed(0)
    model = hf_zoo.mixtral()
    (ids,), kw = hf_zoo.inputs("mixtral", seed=rank)
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    fast = moecompile.optimize(model, (ids,), kw, mesh=mesh)
    opt = torch.optim.AdamW(fast.parameters(), lr=1e-2)
    with PECCheckpointer(fast, opt, directory, every=1, experts_per_ckpt=4, snapshot_dir=None) as ckpt:
        ckpt.restore()
        for step in range(2):
            fast(ids, **kw).loss.backward()
            reduce_gradients(fast, mesh)
            opt.step()
            opt.zero_grad()
            ckpt.step(step)
    fast.eval()
    with torch.no_grad():
        logits = fast(hf_zoo.inputs("mixtral", seed=7)[0][0]).logits
    dist.barrier()
    return logits


def test_hugging_face_model_from_an_expert_parallel_checkpoint(tmp_path):
    """Written at ep=2 from a Mixtral (stacked experts, each rank holding half): exported into a fresh Mixtral,
    saved with save_pretrained, loaded with from_pretrained: the same outputs as the training model."""
    from transformers import MixtralForCausalLM
    logits = run_ranks(_hf_job, 2, tmp_path / "ckpt")
    original = hf_zoo.mixtral()
    original.load_state_dict(export_checkpoint(tmp_path / "ckpt", original), strict=True)
    original.save_pretrained(tmp_path / "hf")
    loaded = MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = loaded(hf_zoo.inputs("mixtral", seed=7)[0][0]).logits
    torch.testing.assert_close(got, logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(logits[0], logits[1])
