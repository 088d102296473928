"""Translation validation cannot be fooled by precision or by side effects.

Two rewrites that were wrong and yet reported as validated: one that computed a block's bf16 expert GEMMs
in fp32 (the float64 second opinion also ignored the block's casts, so the difference looked like
rounding), and one that dropped the block's update of a load-counter buffer (only outputs and gradients
were compared). Both blocks are hand-written here (tests/zoo.py SortedBank)."""
import types

import pytest
import torch

import moecompile
from moecompile.validation import _run_in_float64, compare
from tests.helpers import assert_same_training_step
from tests.zoo import Net, ReluMLP, SortedBank


def _x(seed=0):
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(seed))


def _without(block: SortedBank, **changes):
    """The block's forward with some of its settings changed for the call: a lift that forgets something."""
    def forward(self, x):
        saved = {name: getattr(self, name) for name in changes}
        vars(self).update(changes)
        try:
            return SortedBank.forward(self, x)
        finally:
            vars(self).update(saved)
    return types.MethodType(forward, block)


def _wider(block: SortedBank):
    """The lift that computes the narrow GEMMs in the block's input precision (drops the casts)."""
    return _without(block, narrow=None)


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_dropping_low_precision_casts_fails_validation(narrow):
    torch.manual_seed(0)
    block = SortedBank(narrow=narrow)
    err, label, _ = compare(block, block.forward, _wider(block), _x(), (), {}, seed=0)
    assert err > 1e-3, (err, label)
    # the faithful rewrite (here: the block itself) passes
    assert compare(block, block.forward, block.forward, _x(), (), {}, seed=0)[0] == 0.0


def test_float64_evaluation_keeps_the_casts():
    """The second opinion rounds where the original rounds: the original is at fp32 distance from it, the
    rewrite without casts at bf16 distance."""
    torch.manual_seed(0)
    block, x = SortedBank(narrow=torch.bfloat16), _x()
    truth = dict(_run_in_float64(block, x, (), {}, seed=0))["output 0"]
    original, wider = block(x).detach().double(), _wider(block)(x).detach().double()
    scale = truth.abs().max().item()
    assert (original - truth).abs().max().item() < 1e-5 * scale
    assert (wider - truth).abs().max().item() > 1e-3 * scale


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_low_precision_block_is_never_silently_changed(narrow):
    """The block is lifted with its experts in the narrow dtype and computes what the original does."""
    torch.manual_seed(0)
    model, x = Net(SortedBank(narrow=narrow)), _x()
    fast = moecompile.optimize(model, (x,))
    [layer] = moecompile.explain(fast).moe_layers
    assert layer.rewritten and layer.spec.expert.dtype == narrow, layer.reason
    assert_same_training_step(model, fast, (_x(1),), {})


def test_dropping_a_buffer_update_fails_validation():
    torch.manual_seed(0)
    block = SortedBank(tally=True)
    err, label, _ = compare(block, block.forward, _without(block, tally=False), _x(), (), {}, seed=0)
    assert label == "buffer seen" and err == 1.0
    assert block.seen.sum() == 0, "validation leaves the buffer as it found it"


class SequenceCapacity(torch.nn.Module):
    """Top-1 with a capacity that grows with the sequence: S // 4 slots per expert in each sequence. One
    recording (S = 12) shows a capacity of 3; only another sequence length shows it is not a constant."""

    def __init__(self, d=32, e=4):
        super().__init__()
        self.e = e
        self.scorer = torch.nn.Linear(d, e, bias=False)
        self.workers = torch.nn.ModuleList(ReluMLP(d, 2 * d) for _ in range(e))

    def forward(self, x):
        probs = self.scorer(x).softmax(-1)                                     # [B, S, E]
        onehot = torch.nn.functional.one_hot(probs.argmax(-1), self.e)         # [B, S, E]
        keep = onehot * (onehot.cumsum(-2) <= x.shape[1] // 4)
        weight, flat, keep = probs.max(-1).values.reshape(-1, 1), x.reshape(-1, x.shape[-1]), keep.reshape(-1, self.e)
        out = torch.zeros_like(flat)
        for i, worker in enumerate(self.workers):
            (rows,) = torch.where(keep[:, i] > 0)
            out.index_add_(0, rows, worker(flat[rows]) * weight[rows])
        return out.view(x.shape)


def test_a_size_of_the_recorded_call_baked_in_fails_validation():
    torch.manual_seed(0)
    block = SequenceCapacity()
    fast = moecompile.optimize(block, (_x(),))
    [layer] = moecompile.explain(fast).moe_layers
    assert not layer.rewritten and "on input [2, 1, 32]" in layer.reason, layer.reason
    x = torch.randn(3, 20, 32)
    torch.testing.assert_close(fast(x), block(x))
