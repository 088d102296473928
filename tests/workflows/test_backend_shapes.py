"""torch.compile(model, backend="moecompile") while batch size and sequence length change from step to step,
as they do in training and evaluation: every step equals the un-compiled model (logits, loss and every
parameter's gradient within 1e-4), every MoE block is lifted in every graph, and the backend compiles no
more graphs than Dynamo needs: with dynamic=None one for the first shape and one with symbolic sizes for
all the others (automatic dynamic shapes), with dynamic=True one for all.

The shapes have no size 1: Dynamo specializes sizes 0 and 1 with any backend, so a batch of one adds a graph
of its own. Under dynamic=True Dynamo may call the backend twice for the first graph: AOTAutograd
specializes the model's float attributes (the frame's traced again, the first graph discarded), so the
backend calls are bounded, the graphs kept are counted exactly (explain() lists the graphs compiled).
"""
import pytest
import torch

import moecompile
from moecompile import backend
from tests.helpers import assert_same_training_step
from tests.workflows.families import batch, make

EAGER = {"compiler": "eager"}
SHAPES = [(2, 8), (3, 5), (4, 12), (2, 7), (5, 3)]  # (batch, sequence length)
GRAPHS = {None: 2, True: 1}  # graphs compiled for SHAPES


def _moe_layers(model) -> int:
    return sum(1 for _, m in model.named_modules() if hasattr(m, "experts"))


def _train_over_shapes(family, dynamic, monkeypatch, options=EAGER) -> tuple[int, int]:
    """One training step per shape of SHAPES, each checked against eager; (backend calls, graphs compiled)."""
    calls = []
    lift_blocks = backend.lift_blocks
    monkeypatch.setattr(backend, "lift_blocks", lambda *a, **kw: calls.append(1) or lift_blocks(*a, **kw))
    model = make(family)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moecompile", options=options, dynamic=dynamic, fullgraph=True)
    for shape in SHAPES:
        args, kwargs = batch(family, shape, seed=sum(shape))
        assert_same_training_step(model, compiled, args, kwargs)
    layers = moecompile.explain(compiled).moe_layers  # those of every graph compiled
    assert layers and all(m.rewritten for m in layers), [(m.name, m.reason) for m in layers]
    graphs, rest = divmod(len(layers), _moe_layers(model))
    assert rest == 0, [m.name for m in layers]
    return len(calls), graphs


@pytest.mark.parametrize("dynamic", [None, True], ids=["dynamic=None", "dynamic=True"])
@pytest.mark.parametrize("family", ["gpt_moe", "mixtral", "qwen2_moe"])
def test_changing_shapes_train_equal_to_eager(family, dynamic, monkeypatch):
    calls, graphs = _train_over_shapes(family, dynamic, monkeypatch)
    assert graphs == GRAPHS[dynamic], f"{graphs} graphs for {len(SHAPES)} shapes"
    assert calls <= 2, f"{calls} backend calls for {len(SHAPES)} shapes"


@pytest.mark.slow
def test_changing_shapes_under_inductor(monkeypatch):
    """Inductor generates code around the canonical ops for symbolic sizes (C++ here): one graph serves every
    shape, equal to eager."""
    calls, graphs = _train_over_shapes("gpt_moe", True, monkeypatch, options={})
    assert graphs == 1 and calls <= 2, (calls, graphs)
