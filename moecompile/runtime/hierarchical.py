"""Hierarchical (2D) all-to-all over an expert-parallel group of W = nodes × per_node ranks (Tutel's 2DH).

A flat all-to-all sends W−1 messages of S/W bytes from each rank; at large W they are too small to fill a
network link and most of them cross it. The 2D exchange reaches the same result in four phases, on rank
(n, l) = ep rank n·per_node + l, with rows bound for destination (n', l') in blocks:

    x        [rows, ...]   blocks (n', l')-major: the flat layout, what the caller passes
    phase 1  stride copy   → blocks (l', n')-major: rows for the same local index together
    phase 2  intra-node all-to-all: block l' goes to rank (n, l')
             received      blocks (l, n')-major: from each rank of my node, its rows for (n', my l)
    phase 3  stride copy   → blocks (n', l)-major: rows for the same node together
    phase 4  inter-node all-to-all among the ranks of local index l: block n' goes to (n', l), in messages
             per_node× larger than the flat exchange's
    out      [rows_out, ...] blocks (n, l)-major by source: exactly the flat exchange's result

Splits may be uneven or zero. Phase 2 and 3 need, besides this rank's own splits, what every rank of its node
sends to the ranks of its local index: one small all-gather of the send splits over the node ([per_node, W]
ints); equal splits (None) need none.

Why a dedicated thread: phases 3 and 4 can only start when phase 2 has arrived, so chaining async collectives
would leave phase 4 to `Exchange.finish`, exposed. Instead every 2D exchange of a `Hierarchy` runs start to
finish on its one worker thread, in submission order; the caller gets a future at once, so the start/wait
autograd pair and the pipelined executor overlap all four phases with computation. The intra- and inter-node
groups are used by that thread only, and every rank submits its exchanges in the same program order, so the
collectives on each group are issued in the same order everywhere, as they must be.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from moecompile.runtime.cost_model import LinkRates, measure_link, measured_s
from moecompile.runtime.expert_parallel import _segments


class Hierarchy:
    """An expert-parallel group seen as `nodes` × `per_node` ranks (ep rank g is on node g // per_node, local
    index g % per_node), from a DeviceMesh with dimensions ("node", "local"), optionally more before them.
    Holds the intra-node group (this node's ranks, by local index), the inter-node group (the ranks of this
    local index, by node) and the worker thread that runs the 2D exchanges."""

    def __init__(self, mesh2d: DeviceMesh):
        self.intra, self.inter = mesh2d["local"].get_group(), mesh2d["node"].get_group()
        self.nodes, self.per_node = mesh2d["node"].size(), mesh2d["local"].size()
        self.node, self.local = mesh2d.get_local_rank("node"), mesh2d.get_local_rank("local")
        me = dist.get_rank()
        if (dist.get_group_rank(self.intra, me), dist.get_group_rank(self.inter, me)) != (self.local, self.node):
            raise ValueError("moecompile: the node × local mesh must list ranks in increasing order along each "
                             "dimension (process groups number their ranks in sorted order)")
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecompile-2dh")

    @staticmethod
    def of_ep(mesh: DeviceMesh, per_node: int) -> "Hierarchy":
        """The hierarchy of `mesh`'s expert-parallel dimension ("ep", or its only one), consecutive ep ranks
        `per_node` to a node. Collective: every rank of the mesh builds the groups of every node."""
        names = mesh.mesh_dim_names or ()
        ranks = mesh.mesh.movedim(names.index("ep") if "ep" in names else 0, -1)     # [..., ep]
        ep = ranks.shape[-1]
        if per_node < 1 or ep % per_node:
            raise ValueError(f"moecompile: ranks_per_node={per_node} must divide the {ep} expert-parallel ranks")
        grid = ranks.reshape(-1, ep // per_node, per_node)                               # [replicas, nodes, per_node]
        return Hierarchy(DeviceMesh(mesh.device_type, grid, mesh_dim_names=("replica", "node", "local")))

    def all_to_all_single(self, output: Tensor, input: Tensor, output_split_sizes: list[int] | None,
                          input_split_sizes: list[int] | None) -> torch.futures.Future:
        """`dist.all_to_all_single(output, input, ..., async_op=True)` over the ep group, by the four phases:
        queued on the worker thread; the returned future's wait() blocks until `output` is filled (and
        re-raises a failure). `input` must not change until then."""
        done = torch.futures.Future()
        self._worker.submit(self._run, done, output, input, output_split_sizes, input_split_sizes)
        return done

    def _run(self, done, output, input, output_split_sizes, input_split_sizes) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread: no graph for the caller's tensors here
                self._exchange(output, input, output_split_sizes, input_split_sizes)
            done.set_result(output)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            done.set_exception(e)

    def _exchange(self, out: Tensor, x: Tensor, out_splits, in_splits) -> None:
        N, P = self.nodes, self.per_node
        send = torch.tensor(in_splits if in_splits is not None else [x.shape[0] // (N * P)] * (N * P))
        send = send.view(N, P)                                    # [N, P] rows for destination (n', l')
        if in_splits is None:
            mine = torch.full((P, N), x.shape[0] // (N * P))
        else:  # what each rank of my node sends to each rank of my local index
            rows = [torch.empty(N * P, dtype=send.dtype) for _ in range(P)]
            dist.all_gather(rows, send.view(-1), group=self.intra)
            mine = torch.stack(rows).view(P, N, P)[:, :, self.local]  # [P source l, N destination n']
        recv = torch.tensor(out_splits if out_splits is not None else [out.shape[0] // (N * P)] * (N * P))
        staged = x.index_select(0, _block_transpose(send).to(x.device))             # [rows, ...] (l', n')-major
        got = x.new_empty((int(mine.sum()),) + tuple(x.shape[1:]))                   # [Σ mine, ...] (l, n')-major
        dist.all_to_all_single(got, staged, mine.sum(1).tolist(), send.sum(0).tolist(), group=self.intra)
        staged = got.index_select(0, _block_transpose(mine).to(x.device))           # [Σ mine, ...] (n', l)-major
        dist.all_to_all_single(out, staged, recv.view(N, P).sum(1).tolist(), mine.sum(0).tolist(),
                               group=self.inter)

    def rates(self, group) -> tuple[LinkRates, LinkRates, float]:
        """(intra, inter, copy bytes/s) for `cost_model.all_to_all_seconds`: each link's per-message latency
        and bandwidth timed with all-to-alls on the intra- and inter-node groups (every node at once, so a
        node's ranks share its network as in a real exchange), and a stride copy's rate; the slowest figures
        over `group` (the ep group), so every rank predicts, and chooses, the same. Collective over `group`."""
        measured = []
        for sub, size in ((self.intra, self.per_node), (self.inter, self.nodes)):
            link = measure_link(sub) if size > 1 else LinkRates(0.0, float("inf"))  # no peers: never used
            measured += [link.latency_s / max(size - 1, 1), 1 / link.bandwidth_Bps]  # one message at a time
        rows = torch.randn(1 << 14, 64)                                             # [R, D] 4 MiB
        perm = torch.randperm(rows.shape[0])
        copy_s = measured_s("stride copy 4MiB", lambda: rows.index_select(0, perm))
        agreed = torch.tensor(measured + [copy_s / (rows.numel() * rows.element_size())], dtype=torch.float64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        lat_i, inv_i, lat_e, inv_e, inv_copy = agreed.tolist()
        rate = lambda inv: 1 / inv if inv else float("inf")  # noqa: E731
        return LinkRates(lat_i, rate(inv_i)), LinkRates(lat_e, rate(inv_e)), rate(inv_copy)


def _block_transpose(sizes: Tensor) -> Tensor:
    """Row index that re-lays rows stored in blocks (a, c)-major, block (a, c) of sizes[a, c] rows, as
    (c, a)-major blocks: Tutel's stride copy, for uneven blocks. sizes [A, C] → index [Σ sizes]."""
    flat = sizes.reshape(-1)
    starts = (flat.cumsum(0) - flat).view_as(sizes).t().reshape(-1)   # [C·A] each block's start in the input
    lengths = sizes.t().reshape(-1)                                     # [C·A] in output order
    return _segments(starts.tolist(), lengths.tolist(), [0] * lengths.numel(), sizes.device)
