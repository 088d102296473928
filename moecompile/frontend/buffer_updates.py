"""Reading what a block adds to its buffers in its forward (ir/buffer_updates.py carries it over).

Contract:   read(recordings, buffers, E, k) → the BufferUpdates the block makes, from its recordings in
            training and in eval mode (frontend/capture.record; the recorded values are real). Each in-place
            op on a buffer must be an addition of either a value that depends on no input (a constant) or
            one that equals a multiple of the per-expert counts of the recorded top-k choices; anything else
            raises Unsupported naming the buffer. Translation validation then checks the update on other
            inputs and in both modes, as it checks outputs.
Pseudo-code:
    for mode, recording: for each mutating op whose first operand is a buffer:
        addition of v:  v depends on no input          → constant v
                        v == c · bincount(top-k choices) → counts × c
    one update per buffer, made in the modes it was seen in (the same one in each)
"""
from __future__ import annotations

import torch
from torch import fx

from moecompile.frontend.capture import Recording
from moecompile.frontend.graph import Unsupported
from moecompile.ir.buffer_updates import BufferUpdate

aten = torch.ops.aten
ADDITIONS = {aten.add_.Tensor, aten.add_.Scalar}
WHAT_WORKS = ("only additions of the block's per-expert token counts (times a constant), or of a constant, "
              "are carried over; the block keeps its original code")


def read(recordings: dict[bool, Recording], buffers: set[str], num_experts: int, top_k: int
         ) -> tuple[BufferUpdate, ...]:
    seen: dict[str, dict[bool, BufferUpdate]] = {}
    for training, rec in recordings.items():
        for node in rec.graph.nodes:
            name = _mutated_buffer(rec, node, buffers)
            if name is None:
                continue
            if training in seen.get(name, {}):
                raise Unsupported(f"the block updates its buffer '{name}' more than once per call; {WHAT_WORKS}")
            seen.setdefault(name, {})[training] = _addition(rec, node, name, num_experts, top_k, training)
    updates = []
    for name, by_mode in seen.items():
        first, *rest = by_mode.values()
        if any(not _same(first, other) for other in rest):
            raise Unsupported(f"the block updates its buffer '{name}' differently in training and eval mode; "
                              f"{WHAT_WORKS}")
        updates.append(BufferUpdate(name, frozenset(by_mode), first.scale, first.constant))
    return tuple(updates)


def _mutated_buffer(rec: Recording, node: fx.Node, buffers: set[str]) -> str | None:
    if node.op != "call_function" or not hasattr(node.target, "_schema") or not node.args:
        return None
    first = node.target._schema.arguments[0] if node.target._schema.arguments else None
    if first is None or first.alias_info is None or not first.alias_info.is_write:
        return None
    name = rec.params.get(node.args[0])
    return name if name in buffers else None


def _addition(rec: Recording, node: fx.Node, name: str, E: int, k: int, training: bool) -> BufferUpdate:
    if node.target not in ADDITIONS:
        raise Unsupported(f"the block changes its buffer '{name}' in place ({node.target._opname}) in its "
                          f"forward; {WHAT_WORKS}")
    value = node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    buffer = node.args[0].meta["val"]
    if not isinstance(value, fx.Node) or not _reads_an_input(rec, value):  # a call counter and the like
        constant = value.meta["val"] if isinstance(value, fx.Node) else torch.tensor(value)
        return BufferUpdate(name, frozenset({training}), constant=(constant * alpha).to(buffer.dtype).clone())
    added = (value.meta["val"].double() * alpha).reshape(-1)                       # [E]
    counts = _choice_counts(rec, E, k)
    if counts is None or added.shape != counts.shape or tuple(buffer.shape) != (E,):
        raise Unsupported(f"the block adds to its buffer '{name}' something other than per-expert token counts; "
                          f"{WHAT_WORKS}")
    scale = (added.sum() / counts.sum()).item() if counts.sum() > 0 else 1.0
    if not torch.allclose(added, counts * scale, rtol=1e-6, atol=1e-9):
        raise Unsupported(f"the block adds to its buffer '{name}' per-expert values that are not its token counts "
                          f"(e.g. counts after capacity drops, or a running average); {WHAT_WORKS}")
    return BufferUpdate(name, frozenset({training}), scale=scale)


def _reads_an_input(rec: Recording, node: fx.Node) -> bool:
    inputs, stack, done = set(rec.inputs), [node], set()
    while stack:
        n = stack.pop()
        if n in inputs:
            return True
        if n not in done:
            done.add(n)
            stack.extend(n.all_input_nodes)
    return False


def _choice_counts(rec: Recording, E: int, k: int) -> torch.Tensor | None:
    """[E] float64: how many times each expert was chosen by the recorded top-k over E scores."""
    for n in rec.graph.nodes:
        if n.op == "call_function" and n.target is aten.topk.default:
            scores, (_, indices) = n.args[0].meta["val"], n.meta["val"]
            if scores.shape[-1] == E and indices.shape[-1] == k:
                return torch.bincount(indices.reshape(-1), minlength=E).double()
    return None


def _same(a: BufferUpdate, b: BufferUpdate) -> bool:
    if (a.constant is None) != (b.constant is None):
        return False
    return a.scale == b.scale if a.constant is None else torch.equal(a.constant, b.constant)
