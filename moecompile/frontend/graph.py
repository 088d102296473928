"""Graph queries over a recorded block (frontend/capture.py): dependencies, parameter sources, shapes."""
from __future__ import annotations

from operator import getitem

import torch
from torch import fx

from moecompile._lazy import nx
from moecompile.frontend.capture import Recording

aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten._grouped_mm.default}
# ops that change how a tensor is viewed or typed, never its values
PASSTHROUGH = {aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
               aten.permute.default, aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim,
               aten.squeeze.default, aten.expand.default, aten.clone.default, aten.contiguous.default,
               aten._to_copy.default, aten.alias.default, aten.detach.default, aten.select.int,
               aten.slice.Tensor, aten.index.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
               aten.chunk.default, aten.unbind.int, aten.lift_fresh.default, getitem}
TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default}


class Unsupported(Exception):
    """The block was understood as far as the message says, and no further.

    `stage` says how far: 0 no router (not an MoE at all), 1 a router but no experts, 2 experts found but
    not understood, 3 understood but failed translation validation."""

    def __init__(self, message: str, stage: int = 2):
        super().__init__(message)
        self.stage = stage


def param_read(rec: Recording, n) -> str | None:
    """The parameter or buffer `n` is (through view-like ops and casts), by name; None if it is none."""
    while isinstance(n, fx.Node) and n not in rec.params and n.op == "call_function" and n.target in PASSTHROUGH:
        n = n.args[0]
    return rec.params.get(n) if isinstance(n, fx.Node) else None


def shape(n) -> tuple:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


class Reader:
    """Graph queries shared by the steps of `analyze`."""

    def __init__(self, rec: Recording, param_names: set[str]):
        self.rec, self.names = rec, param_names
        self.dag = nx.DiGraph()
        for n in rec.graph.nodes:
            self.dag.add_node(n)
            for a in n.all_input_nodes:
                self.dag.add_edge(a, n)
        self.order = {n: i for i, n in enumerate(rec.graph.nodes)}

    def source_param(self, n) -> tuple[str | None, list[fx.Node]]:
        """Follow view-like ops back to a parameter: (name, chain of nodes from the param to n)."""
        chain = []
        while isinstance(n, fx.Node):
            chain.append(n)
            if n in self.rec.params:
                return self.rec.params[n], chain[::-1]
            if n.op != "call_function" or n.target not in PASSTHROUGH:
                return None, []
            n = n.args[0]
        return None, []

    def param(self, name: str) -> torch.Tensor:
        """The recorded value of a parameter or buffer, by name."""
        return next(n.meta["val"] for n, pname in self.rec.params.items() if pname == name)

    def param_shape(self, name: str) -> tuple:
        return tuple(self.param(name).shape)

    def depends(self, n, on) -> bool:
        return n is on or nx.has_path(self.dag, on, n)

    def between(self, src, dst) -> set[fx.Node]:
        return (nx.descendants(self.dag, src) & nx.ancestors(self.dag, dst)) | {src, dst}

    def users_through_passthrough(self, n) -> list[fx.Node]:
        """n's consumers, looking through view-like ops."""
        out = []
        for u in n.users:
            if u.op == "call_function" and u.target in PASSTHROUGH and u.target is not aten.index.Tensor:
                out.extend(self.users_through_passthrough(u))
            else:
                out.append(u)
        return out


def matmul_operands(n) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(activation-side, weight-side, bias) candidates of a matmul node, in call order."""
    if n.target in (aten.addmm.default, aten.baddbmm.default):
        return n.args[1], n.args[2], n.args[0]
    return n.args[0], n.args[1], None


def constant(v) -> float | None:
    """A Python number, or the value of a recorded one-element tensor that derives from no input or
    parameter of the block (a constant the model code made with torch, e.g. a capacity); else None."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    val = v.meta.get("val") if isinstance(v, fx.Node) else None
    if isinstance(val, torch.Tensor) and val.numel() == 1 and not _from_block(v):
        return float(val.item())
    return None


def _from_block(n: fx.Node) -> bool:
    """Whether a recorded node derives from the block's inputs or parameters."""
    todo, seen = [n], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "placeholder" and m.meta.get("kind") in ("input", "param"):
            return True
        todo += m.all_input_nodes
    return False
