"""Canonical description of one MoE block: what the frontend lifts, what the passes and kernels consume.

A `MoESpec` is pure data (no tensors). The weights it talks about are `WeightRef`s: recipes that fetch the
*original* `Parameter` objects from the block module and take views of them, so the lifted block trains the
same parameters, under the same `state_dict` keys, as the model it came from.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

GATED_ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
OPS = ("route", "dispatch", "expert_ffn", "combine")  # the canonical ops (ir/ops.py), in execution order


@dataclass(frozen=True)
class RouteSpec:
    """scores = scoring(logits); experts chosen by top-k of (scores + bias), optionally limited to the best
    `topk_group` of `n_group` expert groups; weights = scores of the chosen experts, renormalized to sum to
    one if `renormalize`, times `scale`. The experts of the groups not kept are set to 0 before the top-k
    (`group_fill` "zero", as DeepSeek's Hugging Face code) or left out whatever their scores ("exclude": -inf,
    as DeepSeek's own code; differs from "zero" when a score bias makes a kept score negative)."""
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) or "top2sum" (DeepSeek-V3)
    group_fill: str = "zero"  # "zero" or "exclude"
    later_above: float | None = None  # choices after the first are dispatched only where their weight exceeds
                                      # this (GShard's "threshold" second-expert policy); None: always
    renormalize_kept: bool = False    # weights renormalized over the choices capacity kept (instead of
                                      # `renormalize`, over all k before drops)
    dtype: torch.dtype | None = None  # the precision the block computes its router's logits in, below its
                                      # own (None: its own); frontend/precision.py


@dataclass(frozen=True)
class ExpertSpec:
    """One expert: h = act(x W1ᵀ + b1) [* (x W3ᵀ + b3) when gated]; y = h W2ᵀ + b2.

    `fused` says W1 is one [2F, D] gate/up projection and W3 is absent: "halves" ([gate; up] rows) or
    "interleaved" (gate rows even, up rows odd); "" when gate and up are separate (or not gated)."""
    activation: str
    bias: bool = False
    fused: str = ""
    alpha: float = 1.702   # clamped_swiglu only
    limit: float = 7.0     # clamped_swiglu only
    dtype: torch.dtype | None = None  # the precision the block computes its experts in, below its own (None: its own)


@dataclass(frozen=True)
class CapacitySpec:
    """Fixed per-expert buffers: within each capacity group of consecutive tokens, an expert takes at most
    `capacity` token-slots, first come first served. A dropped slot contributes zero, or the token's own
    input when `dropped == "identity"` (Switch Transformers).

    `group` says what a group is, for any call, not for the call the block was read on:
      "call"      all the tokens of a call (under expert parallelism: a rank's);
      "fixed"     `group_size` consecutive tokens, the same in every call (GShard-style groups);
      "sequence"  each sequence of the block's input x [..., S, D]: S = x.shape[-2] tokens, whatever S is
                  in a call (Hugging Face Switch Transformers: `expert_capacity` slots per sequence).
    Left unset it follows `group_size`: "fixed" if > 0, else "call". `for_input(x.shape)` resolves a spec
    for one call to the "fixed"/"call" form the kernels take (`group_size` = tokens per group, 0 = all).

    `order` is the order slots take capacity in: "token" (t·k + j: a token's choices together) or "choice"
    (GShard: within a group, every token's first choice before any second choice). With `factor` > 0 the
    capacity is the block's own rule for each call, max(`min_capacity`, ⌈k·factor·G/E⌉) for G tokens per
    group (`for_tokens`); `capacity` is then the recorded call's."""
    capacity: int
    group_size: int = 0
    dropped: str = "zero"
    group: str = ""
    order: str = "token"
    factor: float = 0.0
    min_capacity: int = 0

    def __post_init__(self):
        group = self.group or ("fixed" if self.group_size else "call")
        if group not in CAPACITY_GROUPS:
            raise ValueError(f"CapacitySpec group={self.group!r}: expected one of {CAPACITY_GROUPS}")
        if not torch.compiler.is_compiling() and type(self.group_size) is int and \
                (group == "fixed") != (self.group_size > 0):  # a traced call's sizes may be symbolic: no guard
            raise ValueError(f"CapacitySpec group={group!r} with group_size={self.group_size}: a group_size > 0 "
                             "is what a \"fixed\" group takes, and only it")
        object.__setattr__(self, "group", group)

    def __setstate__(self, state):  # unpickling one saved before `group` existed: what group_size meant then
        state.setdefault("group", "fixed" if state.get("group_size") else "call")
        self.__dict__.update(state)

    def for_input(self, input_shape) -> "CapacitySpec":
        """This spec for one call on hidden states of `input_shape` [..., S, D]: a per-sequence group
        becomes S tokens (S may be a symbolic size when traced); other groups do not depend on the call."""
        if self.group != "sequence":
            return self
        seq = input_shape[-2] if len(input_shape) >= 2 else 1
        if isinstance(seq, int) and seq == 0:  # no tokens: nothing to group
            return dataclasses.replace(self, group_size=0, group="call")
        return dataclasses.replace(self, group_size=seq, group="fixed")

    def for_tokens(self, tokens, top_k: int, num_experts: int) -> "CapacitySpec":
        """This spec with its rule applied (`factor`) for a call of `tokens` tokens, groups resolved
        (for_input): the capacity of each group of that call."""
        if not self.factor:
            return self
        G = self.group_size if self.group_size else tokens
        # rounded first: 1.25·32/4 is 10 slots however the product rounds in floating point
        rule = math.ceil(round(top_k * self.factor * G / num_experts, 9))
        return dataclasses.replace(self, capacity=max(self.min_capacity, rule), factor=0.0)

    def describe(self) -> str:
        """The groups in words, for reports: "per sequence", "per 12 tokens" or "" (all of a call's)."""
        return {"sequence": "per sequence", "fixed": f"per {self.group_size} tokens"}.get(self.group, "")


CAPACITY_GROUPS = ("call", "fixed", "sequence")


def dtype_name(dtype: torch.dtype) -> str:
    """How reports name a precision: "bfloat16" for torch.bfloat16."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AuxLossSpec:
    """The auxiliary loss a block returns ("aux" in MoESpec.outputs), from its router logits [T, E] and each
    token's first choice: `balance` · E · Σ_e mean_t p[t, e] · mean_t [first[t] = e] (GShard's and Switch's
    balancing loss, p the softmax of the logits, the first choice counted before capacity drops) +
    `z` · mean_t logsumexp(logits[t])² (ST-MoE's router z-loss). `grouped`: the balancing loss is taken in
    each capacity group and averaged over the groups (GShard's groups), instead of over all the tokens."""
    balance: float = 0.0
    z: float = 0.0
    grouped: bool = False


@dataclass(frozen=True)
class RoutingOverride:
    """What `optimize(capacity_factor=, batch_prioritized=)` and `set_routing()` change in a block's routing.

    `capacity_factor` x replaces the block's capacity (its `CapacitySpec.capacity`; a dropless block gets
    one) by Tutel's rule, per capacity group of G tokens (the block's own groups, else all of a call's tokens:
    under expert parallelism, a rank's): x > 0: C = ⌈k·x·G/E⌉; x = 0: the smallest C that drops nothing in
    this call, the largest per-expert count of any group; x < 0: that, capped at ⌈k·|x|·G/E⌉. Under expert
    parallelism the ranks agree on the largest C (the exchange is a fixed [E, C, D] buffer). None keeps the
    block's own capacity, or none. What a dropped slot contributes stays the block's (`dropped`).
    `batch_prioritized` (V-MoE, Tutel): within a group, slots are kept in order of their token's importance,
    its largest router score (descending; ties in token order), instead of token order."""
    capacity_factor: float | None = None
    batch_prioritized: bool = False


@dataclass
class DropStats:
    """Token-slots (token, expert choice) a block routed and its capacity dropped: summed over the calls with
    gradients enabled (training), and for the last call, with the capacity (per group) it used. Counts of
    eager calls, on this rank; traced calls (export, torch.compile) are not counted."""
    routed: int = 0
    dropped: int = 0
    last_routed: int = 0
    last_dropped: int = 0
    last_capacity: int | None = None

    def record(self, routed: int, kept: int, capacity: int, training: bool) -> None:
        self.last_routed, self.last_dropped, self.last_capacity = routed, routed - kept, capacity
        if training:
            self.routed += routed
            self.dropped += routed - kept


@dataclass(frozen=True)
class WeightRef:
    """A view of one original parameter: `param[index]`, then the last two dims swapped if `transpose`.

    `index` is a tuple of ints/slices applied with ordinary indexing, e.g. (slice(0, 64),) picks rows
    0..63 of a fused [2F, D] gate/up weight. The result is in nn.Linear layout [out, in]. A `stacked` ref
    covers all experts of an [E, ...] parameter at once: `index` then applies after the expert dim."""
    name: str
    index: tuple = ()
    transpose: bool = False
    stacked: bool = False

    def get(self, module: nn.Module) -> torch.Tensor:
        w = attr_path(module, self.name)
        if self.index:
            w = w[((slice(None),) if self.stacked else ()) + self.index]
        return w.transpose(-2, -1) if self.transpose else w


def attr_path(module: nn.Module, name: str):
    """module's attribute at dotted `name` ("experts.gate_up_proj"), by plain getattr: get_submodule's
    checks cost ~6 µs a call at decode sizes, where each block reaches its weights on every call."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


@dataclass
class ExpertWeights:
    """Per role, the experts' weights: one stacked WeightRef ([E, ...] parameter), or a list of E refs
    (one parameter per expert, e.g. a ModuleList); w3/b* are None when absent."""
    w1: WeightRef | list[WeightRef]
    w2: WeightRef | list[WeightRef]
    w3: WeightRef | list[WeightRef] | None = None
    b1: WeightRef | list[WeightRef] | None = None
    b2: WeightRef | list[WeightRef] | None = None
    b3: WeightRef | list[WeightRef] | None = None

    def fetch(self, module: nn.Module) -> dict[str, list[torch.Tensor] | None]:
        """The weights as the ops take them: a stacked weight as one [E, ...] view (its gradient is then made
        in the parameter's own layout: no stack of E per-expert gradients, which costs a copy of the whole
        weight every step), else the E per-expert tensors."""
        return {k: None if refs is None else
                [refs.get(module)] if isinstance(refs, WeightRef) else [r.get(module) for r in refs]
                for k, refs in vars(self).items()}


@dataclass
class MoESpec:
    """Everything needed to run a block through the canonical ops.

    `shared` names a dense submodule every token passes (a shared expert); `shared_gate`, if set, is a
    [1, D] weight (plus optional bias) whose sigmoid(x·w + b) scales the shared output. `outputs` says
    what the block returns, in order: "out" (the block's result), "logits" (router logits [T, E], for auxiliary losses),
    "weights" (the routing weights [T, k]), "aux" (the auxiliary loss `aux` describes, a scalar) or "counts" (tokens
    per first choice before capacity drops [E], int64)."""
    hidden: int
    route: RouteSpec
    expert: ExpertSpec
    router: WeightRef
    weights: ExpertWeights
    router_bias: WeightRef | None = None
    score_bias: WeightRef | None = None
    capacity: CapacitySpec | None = None         # the block's own (None: dropless)
    routing: RoutingOverride = RoutingOverride()  # what the user set over it
    drops: DropStats = field(default_factory=DropStats)
    shared: str | None = None
    shared_gate: WeightRef | None = None
    shared_gate_bias: WeightRef | None = None
    outputs: tuple[str, ...] = ("out",)
    router_module: str | None = None   # the submodule that routes, when the block delegates to one...
    router_module_flat: bool = True    # ...and whether it was called on [T, D] tokens or on x itself
    kernels: dict[str, str] = field(default_factory=lambda: dict.fromkeys(OPS, "native"))  # op → backend
    decode_slots: int = 0              # eager calls with tokens·k ≤ this take the decode path (kernels'
                                       # decode_ffn), set by select_kernels; 0: never
    stacked_path: bool = False         # eager CPU calls may take kernels' stacked_ffn where it pays (set by
                                       # select_kernels: stacked weights, native kernels)
    fast_path: bool = False            # eager calls without autograd may take fast_path.fast_call (select_kernels)
    bag_slots: int = 0                 # ...and with tokens·k ≤ this, kernels/bagged.py (select_kernels); 0: never
    onednn: bool = False               # its fp32 expert GEMMs run on oneDNN where native can (select_kernels)
    parallel: object | None = None     # runtime.expert_parallel.ExpertParallel, set by the expert_parallel pass
    shortcut: object | None = None     # passes.shortcut.Tap: the routed branch's input (ScMoE), else x itself
    expert_load: torch.Tensor | None = None  # [E] token-expert assignments counted in training forwards, when set
                                              # (runtime/checkpoint.py: PEC's load-aware selection and lost tokens)
    expert_autocast: dict[str, bool] = field(default_factory=dict)  # device type → whether torch.autocast lowers
                                              # the original's expert matmuls (api._note_autocast; unset: it does)
    notes: list[str] = field(default_factory=list)
    aux: AuxLossSpec | None = None     # what the "aux" output is, when the block returns one
    buffer_updates: tuple = ()         # ir/buffer_updates.BufferUpdate: what the block adds to its buffers
    combine_dtype: torch.dtype | None = None  # the precision the block weights and sums its experts' outputs
                                              # in, below its own (None: its own); frontend/precision.py
    combine_sums_once: bool = False    # that combine is a matmul: operands rounded, each token's sum rounded once
    raised_stages: tuple = ()          # (stage, dtype) the original computes in and the rewrite computes in the
                                       # block's own precision instead: optimize(precision="model")
    input_dims: int | None = None      # the number of dims the block's hidden states must have (None: any ≥ 1)

    @property
    def num_experts(self) -> int:
        return self.route.num_experts

    @property
    def top_k(self) -> int:
        return self.route.top_k
