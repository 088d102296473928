"""The hierarchical (2D) all-to-all on 4 gloo ranks as 2 nodes × 2 equals the flat one, and a model optimized
with it equals one process.

Both tests share one spawn of the 4 ranks (moecompile/runtime/spawn.py; ~9 s of spawn and imports saved), which runs
each test's cases in turn, as test_expert_parallel.py does, whose model harness the second test reuses.
"""
import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import moecompile
from moecompile.runtime import all_to_all as a2a
from moecompile.runtime.hierarchical import Hierarchy
from moecompile.runtime.spawn import run_ranks
from tests.helpers import run_jobs
from tests.test_expert_parallel import TOL, _build, _global_batch, _model_cases, _slice

W = 4
# rows rank r sends rank q: [W, W], or an int k for equal splits of k rows (the exchange given None splits)
EXCHANGE_CASES = {
    "equal splits (None)": 3,
    "even explicit splits": [[2] * W] * W,
    "uneven": [[1, 4, 0, 2], [3, 1, 2, 5], [2, 0, 1, 1], [0, 3, 4, 2]],
    "a rank sends nothing, a rank receives nothing": [[1, 0, 2, 3], [0, 0, 0, 0], [4, 0, 1, 1], [2, 0, 3, 0]],
    "only across nodes": [[0, 0, 2, 1], [0, 0, 3, 2], [1, 4, 0, 0], [2, 2, 0, 0]],
    "no rows anywhere": [[0] * W] * W,
}


def _diff(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def _flat(x, splits_out, splits_in):
    y = x.new_empty((sum(splits_out) if splits_out else x.shape[0],) + tuple(x.shape[1:]))
    dist.all_to_all_single(y, x, splits_out, splits_in)
    return y


def _exchange_cases(rank, ws, cases):
    """Per case, the largest difference from the flat exchange of the output and of the input's gradient
    (the backward is the reverse 2D exchange); plus two exchanges in flight at once, waited out of order."""
    hierarchy = Hierarchy(init_device_mesh("cpu", (2, 2), mesh_dim_names=("node", "local")))
    errors = {}
    for name, matrix in cases.items():
        g = torch.Generator().manual_seed(1)
        if isinstance(matrix, int):
            in_splits = out_splits = None
            rows_in = rows_out = matrix * ws
        else:
            in_splits, out_splits = matrix[rank], [row[rank] for row in matrix]
            rows_in, rows_out = sum(in_splits), sum(out_splits)
        x = (torch.randn(rows_in, 3, 2, generator=g) + rank).requires_grad_()
        cot = torch.randn(rows_out, 3, 2, generator=g) + rank
        ex = a2a.Exchange(dist.group.WORLD, in_splits, out_splits, rows_out, algorithm="2dh", hierarchy=hierarchy)
        y = a2a.wait(a2a.start(x, ex), ex)
        (y * cot).sum().backward()
        want_y, want_grad = _flat(x.detach(), out_splits, in_splits), _flat(cot, in_splits, out_splits)
        errors[name] = max(_diff(y, want_y), _diff(x.grad, want_grad))
    matrix = cases["uneven"]
    splits = [(m[rank], [row[rank] for row in m]) for m in (matrix, [list(r) for r in zip(*matrix)])]
    xs = [torch.randn(sum(s_in), 5) + rank for s_in, _ in splits]
    exs = [a2a.Exchange(dist.group.WORLD, s_in, s_out, sum(s_out), algorithm="2dh", hierarchy=hierarchy)
           for s_in, s_out in splits]
    tokens = [a2a.start(x, ex) for x, ex in zip(xs, exs)]
    got = [a2a.wait(tokens[i], exs[i]) for i in (1, 0)][::-1]
    errors["two in flight, waited out of order"] = max(
        _diff(y, _flat(x, s_out, s_in)) for y, x, (s_in, s_out) in zip(got, xs, splits))
    return errors


def test_2d_exchange_equals_flat(runs):
    results = runs["exchange"]
    for name in [*EXCHANGE_CASES, "two in flight, waited out of order"]:
        worst = max(r[name] for r in results)
        assert worst == 0, f"{name}: differs from the flat all-to-all by {worst:.2e}"


@pytest.fixture(scope="module")
def runs():
    """{"exchange" | "models": each rank's result}: both tests' cases, run in one spawn of the W ranks."""
    per_rank = run_ranks(run_jobs, W, {"exchange": (_exchange_cases, EXCHANGE_CASES),
                                       "models": (_model_2d_cases, MODEL_CASES)})
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


# ---- whole models: optimize(mesh, all_to_all="2dh", ranks_per_node=2) on a 4-rank ep mesh ------------------
TWO_D = {"all_to_all": "2dh", "ranks_per_node": 2}
MODEL_CASES = {
    "gpt_moe, 2dh": ("gpt_moe", "off", TWO_D),
    "gpt_moe, 2dh, pipelining degree 2": ("gpt_moe", 2, TWO_D),
    "switch (capacity, fixed buffers), 2dh, degree 2": ("switch", 2, TWO_D),
}


def _model_2d_cases(rank, ws, cases):
    """test_expert_parallel's model cases, counting the 2D exchanges they ran; then the "auto" choice as
    explain() shows it."""
    runs = []
    submit = Hierarchy.all_to_all_single
    Hierarchy.all_to_all_single = lambda self, *a: runs.append(1) or submit(self, *a)
    try:
        errors = _model_cases(rank, ws, (ws,), cases)
    finally:
        Hierarchy.all_to_all_single = submit
    errors["2D exchanges ran"] = 0.0 if runs else 1.0
    mesh = init_device_mesh("cpu", (ws,), mesh_dim_names=("ep",))
    args, kwargs = _slice(_global_batch("gpt_moe", 2 * ws), rank, ws)
    fast = moecompile.optimize(_build("gpt_moe"), args, kwargs, mesh=mesh, all_to_all="auto", ranks_per_node=2)
    layers = moecompile.explain(fast).moe_layers
    shown = [f"all-to-all {layer.spec.parallel.algorithm} over 2 nodes × 2 ranks (predicted per exchange at "
             f"degree 1: linear " in layer.details and "ms, 2dh " in layer.details for layer in layers]
    errors["auto: explain shows the choice and both predictions"] = float(not (layers and all(shown)))
    return errors


def test_models_with_2d_exchange_match_one_process(runs):
    results = runs["models"]
    for name in [*MODEL_CASES, "2D exchanges ran", "auto: explain shows the choice and both predictions"]:
        worst = max(r[name] for r in results)
        assert worst < TOL, f"{name}: relative error {worst:.2e}"
