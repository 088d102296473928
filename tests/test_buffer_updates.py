"""Blocks that update buffers in their forward are lifted with the update carried over (a per-expert token
count, as auxiliary-loss-free balancing keeps; a call counter), or refused with a reason naming the buffer
when the update is something else. Compared with the original over training and eval calls."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moecompile
from tests.helpers import assert_same_training_step
from tests.zoo import Net, SortedBank, SwiGLU


class Tallied(nn.Module):
    """Softmax top-2 over a ModuleList of SwiGLU workers, with a buffer `ledger` updated per call by
    `rule`: "counts" (training only, the per-worker slot counts), "share" (counts / slots: a scale that
    depends on the call's size), "calls" (+1 per call, both modes), "decay" (a running average)."""

    def __init__(self, rule: str, d=32, f=48, e=4, k=2):
        super().__init__()
        self.rule, self.e, self.k = rule, e, k
        self.pick = nn.Linear(d, e, bias=False)
        self.workers = nn.ModuleList(SwiGLU(d, f) for _ in range(e))
        self.register_buffer("ledger", torch.zeros(1 if rule == "calls" else e))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])                                       # [T, D]
        w, idx = self.pick(flat).softmax(-1).topk(self.k, dim=-1)             # [T, K]
        counts = F.one_hot(idx, self.e).sum((0, 1)).float()                   # [E]
        if self.rule == "counts" and self.training:
            self.ledger += counts
        elif self.rule == "share":
            self.ledger += counts / idx.numel()
        elif self.rule == "calls":
            self.ledger += 1
        elif self.rule == "decay":
            self.ledger.mul_(0.9).add_(counts)
        out = torch.zeros_like(flat)
        for i, worker in enumerate(self.workers):
            rows, slot = torch.where(idx == i)
            out.index_add_(0, rows, worker(flat[rows]) * w[rows, slot, None])
        return out.view_as(x)


def _x(seed=0, s=8):
    return torch.randn(2, s, 32, generator=torch.Generator().manual_seed(seed))


def _ledger(model):
    return next(b for name, b in model.named_buffers() if name.endswith(("ledger", "seen")))


def _check_same_buffers_over_calls(model, fast):
    """Training and eval calls of several sizes leave the same buffer values in the original and the
    optimized model (which share their buffers: compared by running each from the same start)."""
    for training, seed, s in [(True, 1, 8), (True, 2, 3), (False, 3, 8), (True, 4, 16)]:
        model.train(training), fast.train(training)
        start = _ledger(model).clone()
        with torch.no_grad():
            model(_x(seed, s))
        want = _ledger(model).clone()
        _ledger(model).copy_(start)
        with torch.no_grad():
            fast(_x(seed, s))
        assert torch.equal(_ledger(fast), want), (training, s)


@pytest.mark.parametrize("compiled_in", ["train", "eval"])
@pytest.mark.parametrize("make", [lambda: Tallied("counts"), lambda: Tallied("calls"),
                                  lambda: SortedBank(tally=True)], ids=["counts", "calls", "grouped-gemm"])
def test_buffer_updates_are_carried_over(make, compiled_in):
    """Compiled in eval mode, a training-only counter does not show in the call: it is read from a
    recording in the other mode."""
    torch.manual_seed(0)
    model = Net(make()).train(compiled_in == "train")
    fast = moecompile.optimize(model, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten, layer.reason
    assert any(note.startswith("carries over buffer") for note in layer.spec.notes), layer.spec.notes
    _check_same_buffers_over_calls(model, fast)
    model.train(), fast.train()
    assert_same_training_step(model, fast, (_x(5),), {})


@pytest.mark.parametrize("rule, why", [
    ("decay", "changes its buffer 'ledger' in place (mul_)"),
    ("share", "buffer 'ledger'"),  # right on the recorded call; another token count shows the scale moves
])
def test_other_buffer_updates_are_refused_naming_the_buffer(rule, why):
    torch.manual_seed(0)
    model = Net(Tallied(rule)).train()
    fast = moecompile.optimize(model, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert not layer.rewritten and why in layer.reason, layer.reason
    _check_same_buffers_over_calls(model, fast)
