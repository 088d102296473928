"""All-to-all as a start/wait pair of autograd nodes, so a schedule can put work between the two halves.

    token = start(x, exchange)        # issues all_to_all_single(async_op=True) and returns at once
    ...                               # computation that does not need the result overlaps the transfer
    y = wait(token, exchange)         # blocks until the rows have arrived: y [sum(out_splits), D]

Backward reverses the roles: `wait`'s backward *starts* the reverse exchange of the gradient (out_splits and
in_splits swapped) and `start`'s backward waits for it. The autograd engine runs ready nodes latest-created
first, so a forward schedule start₀ start₁ wait₀ f₀ … replays as an overlapped backward schedule with no extra
machinery: the reverse exchange of chunk i is in flight while chunk i+1's backward computes.

Every rank must issue its exchanges in the same order (collectives match by order); the executors here do so
by construction, since every rank runs the same program.
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from torch import Tensor


class Exchange:
    """One all-to-all of rows: rank r sends in_splits[q] rows to each rank q and receives out_splits[q] from
    it (Python ints, or None for equal splits). Holds the work handle between start and wait, both ways.
    `algorithm` "linear" is one all_to_all_single over `group`; "2dh" the same exchange in Tutel's four
    hierarchical phases over `hierarchy`'s intra- and inter-node groups (runtime/hierarchical.py), both ways.
    `stats["forward"|"backward"]` accumulates the seconds spent blocked in waits: the exposed communication;
    `stats["backward_begin"|"backward_end"]` mark the first backward launch and the last backward wait."""

    def __init__(self, group, in_splits: list[int] | None, out_splits: list[int] | None, rows_out: int,
                 stats: dict | None = None, algorithm: str = "linear", hierarchy=None):
        if algorithm not in ("linear", "2dh") or (algorithm == "2dh" and hierarchy is None):
            raise ValueError(f"all-to-all algorithm {algorithm!r}: expected 'linear', or '2dh' with a hierarchy")
        self.group, self.in_splits, self.out_splits, self.rows_out = group, in_splits, out_splits, rows_out
        self.algorithm, self.hierarchy = algorithm, hierarchy
        self.stats = defaultdict(float) if stats is None else stats
        self.work = self.result = self.sent = None
        # (list, chunk, forward step, backward step) while a timeline is recorded (ExpertParallel.trace):
        # finish appends ("link", step, chunk, launched, end), ("issue", step, chunk, launched, issued): the
        # launch call itself, and ("wait", step, chunk, blocked, end)
        self.trace, self.launched, self.issued = None, 0.0, 0.0

    def launch(self, x: Tensor, rows: int, out_splits, in_splits) -> None:
        if self.trace is not None:
            self.launched = time.perf_counter()
        self.sent = x.contiguous()  # kept alive until the transfer completes
        self.result = x.new_empty((rows,) + tuple(x.shape[1:]))
        if self.algorithm == "2dh":
            self.work = self.hierarchy.all_to_all_single(self.result, self.sent, out_splits, in_splits)
        else:
            self.work = dist.all_to_all_single(self.result, self.sent, out_splits, in_splits, group=self.group,
                                               async_op=True)
        if self.trace is not None:
            self.issued = time.perf_counter()

    def finish(self, direction: str) -> Tensor:
        t = time.perf_counter()
        self.work.wait()
        now = time.perf_counter()
        self.stats[direction] += now - t
        if direction == "backward":
            self.stats["backward_end"] = now
        if self.trace is not None:
            out, chunk, forward_step, backward_step = self.trace
            step = forward_step if direction == "forward" else backward_step
            out += [("link", step, chunk, self.launched, now), ("issue", step, chunk, self.launched, self.issued),
                    ("wait", step, chunk, t, now)]
        result, self.work = self.result, None
        self.result = self.sent = None
        return result


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, ex: Exchange) -> Tensor:
        ctx.ex = ex
        ex.launch(x, ex.rows_out, ex.out_splits, ex.in_splits)
        return x.new_empty(0)  # a token: the edge that makes `wait` depend on `start`

    @staticmethod
    def backward(ctx, _grad_token):
        return ctx.ex.finish("backward"), None  # the reverse exchange `wait`'s backward started


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token: Tensor, ex: Exchange) -> Tensor:
        ctx.ex = ex
        return ex.finish("forward")

    @staticmethod
    def backward(ctx, grad: Tensor):
        ex = ctx.ex
        rows_in = sum(ex.in_splits) if ex.in_splits is not None else grad.shape[0]
        ex.stats.setdefault("backward_begin", time.perf_counter())
        ex.launch(grad, rows_in, ex.in_splits, ex.out_splits)  # splits swapped: the rows go home
        return grad.new_empty(0), None


def start(x: Tensor, ex: Exchange) -> Tensor:
    """Issue the exchange of x's rows; returns a token for `wait`."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Start.apply(x, ex)
    ex.launch(x, ex.rows_out, ex.out_splits, ex.in_splits)
    return x.new_empty(0)


def wait(token: Tensor, ex: Exchange) -> Tensor:
    """The exchanged rows, once they have arrived."""
    if token.requires_grad:
        return _Wait.apply(token, ex)
    return ex.finish("forward")


# ---- traced (torch.compile) ---------------------------------------------------------------------------------
# The start/wait pair above is opaque Python to Dynamo (its work handle breaks the graph). Traced code uses the
# functional collective ops instead: `_c10d_functional.all_to_all_single` issues the exchange and returns its
# future result, `wait_tensor` is the wait; both are graph nodes with autograd formulas (the backward issues
# the reverse exchange and waits for it at once). Calling the two ops directly, rather than through
# torch.distributed._functional_collectives (whose traced form waits at once), keeps the wait where the
# schedule puts it. Splits may be unbacked SymInts.
# Always "linear": the 2D algorithm's worker thread cannot be traced.

def start_traced(x: Tensor, in_splits: list, out_splits: list, group) -> Tensor:
    """Issue the exchange of x's rows; the result may be read only after `wait_traced`."""
    return torch.ops._c10d_functional.all_to_all_single(x.contiguous(), out_splits, in_splits,
                                                        fc._resolve_group_name(group))


def wait_traced(in_flight: Tensor) -> Tensor:
    return torch.ops._c10d_functional.wait_tensor(in_flight)
