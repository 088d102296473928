"""The one-hot dispatch-mask family (GShard, Switch's mask formulation, ST-MoE's top-n gating), read by dataflow.

Such a gate chooses k experts per token one after another (argmax, then argmax with the earlier choices
masked out), turns each choice into a one-hot [T, E] mask, numbers each expert's tokens by a cumsum over the
tokens, keeps those numbered below a capacity C, and builds combine weights [T, E, C] (the gate value at
the token's expert and slot) and a dispatch mask (where they are non-zero). The layer then multiplies the
mask with the tokens into [E, C, D] expert inputs, runs the experts on them and multiplies the combine
weights with the results:

    x ─ router ─ argmax ─ one-hot ─ cumsum ─ < C ─ combine [T, E, C] ─┬─ mask @ x ─ experts ─┐
                   └─ argmax (others masked) ─ ... ─────────────────────┘                  combine @ y ─ out

What maps onto the spec: the choices are a top-k (k = number of choices); the weights the scores at the
chosen experts, renormalized over the k before drops or over the kept after them; the capacity of each
group (all of a call's tokens, or each sequence; its rule read from recordings at other token counts),
with a later choice's numbering starting after every earlier choice's ("choice" order); a threshold a
later choice's weight must exceed; the auxiliary loss the block returns (AuxLossSpec). The mask products
themselves are replaced by the dispatch/combine ops. Random policies (noise on the logits, a sampled
second choice, random token priority) are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import fx

from moecompile._lazy import nx
from moecompile.frontend.capture import SELECTIONS, record
from moecompile.frontend.graph import PASSTHROUGH, Reader, Unsupported, constant, matmul_operands, shape
from moecompile.ir.choices import aux_loss
from moecompile.ir.spec import AuxLossSpec

aten = torch.ops.aten
RANDOM = {aten.uniform_.default, aten.rand_like.default, aten.rand.default, aten.randn.default,
          aten.randn_like.default, aten.exponential_.default, aten.normal_.default, aten.bernoulli.default,
          aten.bernoulli_.float, aten.bernoulli_.Tensor, aten.randint.low, aten.randint.default,
          aten.randperm.default, aten.multinomial.default, aten.geometric_.default, aten.random_.default}
CAPACITY_TESTS = {aten.lt.Scalar: "lt", aten.lt.Tensor: "lt", aten.le.Scalar: "le", aten.le.Tensor: "le"}
THRESHOLDS = {aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar, aten.ge.Tensor}
SCORINGS = {aten._softmax.default: "softmax", aten.softmax.int: "softmax", aten.sigmoid.default: "sigmoid"}
OFFSETS = {aten.sub.Tensor, aten.add.Tensor, aten.sub.Scalar, aten.add.Scalar}
GUARDS = {aten.add.Tensor, aten.clamp.default, aten.clamp_min.default}
FIRST_CHOICE = {aten.argmax.default: lambda v: v, aten.max.dim: lambda v: v[1],   # recorded value → [T] choices
                aten.topk.default: lambda v: v[1][..., 0]}
# what makes the routing random, by where the randomness enters: reasons in the user's words
WHY_RANDOM = ("noise is applied to the router's input or logits before the first choice (jitter or Gumbel noise)",
              "the second-expert choice is random (noise added to the logits it is chosen from)",
              "whether a token's later choice or its slot is kept is random (a sampled second-expert policy "
              "or random token selection)")
LIFTABLE = "; in eval mode, or with a deterministic policy, the block can be lifted"


@dataclass
class MaskDispatch:
    """What the mask reading found; analyze() turns it into the MoESpec."""
    experts: list[fx.Node]          # the experts' matmuls (the mask products left out)
    top_k: int
    scoring: str
    renormalize: bool               # over the k choices, before capacity drops
    renormalize_kept: bool          # over the choices capacity kept
    later_above: float | None
    capacity: int | None            # slots per expert in the recorded call; None: no capacity
    count: fx.Node | None           # the first choice's cumsum (what capacity groups are read from)
    first: fx.Node                  # the first choice's selection
    tests: list[fx.Node]            # the capacity comparisons


def mask_products(g: Reader, routed: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(routed matmuls with a parameter operand, those without: products of a mask with activations)."""
    def has_param(m):
        return any(g.source_param(a)[0] for a in matmul_operands(m)[:2])
    return [m for m in routed if has_param(m)], [m for m in routed if not has_param(m)]


def read_mask_dispatch(g: Reader, router_mm: fx.Node, sels: list[fx.Node], routed: list[fx.Node],
                       E: int) -> MaskDispatch:
    experts, products = mask_products(g, routed)
    dispatch = [m for m in products if any(g.depends(e, m) for e in experts)]
    combine = [m for m in products if any(g.depends(m, e) for e in experts)]
    if not experts or len(dispatch) != 1 or len(combine) != 1 or len(products) != 2:
        raise Unsupported("tokens are dispatched by products with a routing mask, but not as one product into "
                          "the experts' inputs and one out of their outputs")
    choices = sorted((s for s in sels if g.depends(dispatch[0], s)), key=g.order.get)
    _refuse_random(g, choices, combine[0])
    scoring = _scoring(g, router_mm, combine[0])
    tests = _capacity_tests(g, dispatch[0])
    bound = {_capacity_of(g, t) for t in tests}
    if len(bound) > 1:
        raise Unsupported(f"the choices of a token are held to different capacities ({sorted(bound)})")
    if len(choices) > 1 and tests and not _numbered_after_earlier(g, choices, tests):
        raise Unsupported("a later choice is numbered for capacity on its own, not after the earlier choices "
                          "(GShard's order)")
    renorm = _renormalization(g, choices, tests, combine[0])
    first_count = _count_of(g, min(tests, key=g.order.get)) if tests else None
    return MaskDispatch(experts, sum(s.args[1] if s.target is aten.topk.default else 1 for s in choices), scoring,
                        renorm == "before", renorm == "after", _threshold(g, choices, tests, dispatch[0]),
                        bound.pop() if bound else None, first_count, choices[0], tests)


def _refuse_random(g: Reader, choices, combine):
    """Random ops the combine weights depend on refuse the block; the reason says where they enter."""
    random = [n for n in g.rec.graph.nodes if n.op == "call_function" and n.target in RANDOM
              and g.depends(combine, n)]
    if not random:
        return
    where = 0 if any(g.depends(choices[0], n) for n in random) else \
        1 if any(g.depends(c, n) for c in choices[1:] for n in random) else 2
    raise Unsupported(f"dispatch by a one-hot capacity mask: {WHY_RANDOM[where]} in training mode{LIFTABLE}")


def refuse_random_in_training(g: Reader, block: torch.nn.Module) -> None:
    """A block read in eval mode may route at random in training mode (its policy draws only then): recorded
    again in training mode, a random op that a choice or a token count depends on refuses it, since the
    rewrite must hold in both modes. (A block whose input is more than its hidden states is not re-run.)"""
    if block.training or len(g.rec.inputs) != 1:
        return
    modes = {m: m.training for m in block.modules()}
    try:
        block.train()
        again = Reader(record(block, (g.rec.inputs[0].meta["val"],), {}), g.names)
    except Exception:  # it cannot be re-run alone: validation in training mode still compares the two
        return
    finally:
        for m, training in modes.items():
            m.training = training
    nodes = again.rec.graph.nodes
    random = [n for n in nodes if n.op == "call_function" and n.target in RANDOM]
    if any(again.depends(n, r) for n in nodes if n.target in SELECTIONS or n.target is aten.cumsum.default
           for r in random):
        raise Unsupported("dispatch by a one-hot capacity mask: the routing is random in training mode (noise on "
                          "the router logits, or a sampled second-expert or token policy) and a rewrite must hold in "
                          "both modes; with a deterministic policy the block can be lifted")


def _scoring(g: Reader, router_mm, combine) -> str:
    for n in g.rec.graph.nodes:
        if n.target in SCORINGS and g.depends(n, router_mm) and g.depends(combine, n):
            return SCORINGS[n.target]
    raise Unsupported("the combine weights of the one-hot dispatch are not softmax or sigmoid router scores")


def _capacity_tests(g: Reader, dispatch) -> list[fx.Node]:
    """The comparisons of a running count of tokens (cumsum over dim 0) that decide what is dispatched."""
    return [n for n in g.rec.graph.nodes if n.target in CAPACITY_TESTS and g.depends(dispatch, n)
            and _count_of(g, n) is not None]


def recorded_capacities(g: Reader) -> set[int]:
    """The capacities every capacity test of a recording holds tokens to."""
    return {_capacity_of(g, n) for n in g.rec.graph.nodes if n.target in CAPACITY_TESTS and _count_of(g, n)}


def _count_of(g: Reader, test) -> fx.Node | None:
    """The cumsum over tokens a capacity test compares (through constant offsets and added earlier counts)."""
    n = test.args[0]
    while isinstance(n, fx.Node) and n.target in OFFSETS | PASSTHROUGH:
        n = _counted(n)
    if isinstance(n, fx.Node) and n.target is aten.cumsum.default and n.args[1] % len(shape(n)) < len(shape(n)) - 1:
        return n  # a count along the tokens (the last dim is the experts')
    return None


def _counted(n: fx.Node) -> fx.Node:
    """What an offset or a view of a running count was applied to: the operand of the count's own shape (the
    other is a constant, or the earlier choices' per-expert counts [E] broadcast over the tokens)."""
    if n.target in OFFSETS:
        return next((a for a in n.args[:2] if isinstance(a, fx.Node) and shape(a) == shape(n)), n.args[0])
    return n.args[0]


def _capacity_of(g: Reader, test) -> int:
    """Slots an expert keeps: count + offset < C (or ≤ C), with the count starting at 1."""
    offset, n = 0.0, test.args[0]
    while n.target is not aten.cumsum.default:
        if n.target in OFFSETS and isinstance(n.args[1], (int, float)):
            offset += n.args[1] * (-1 if n.target in (aten.sub.Tensor, aten.sub.Scalar) else 1)
        n = _counted(n)
    bound = constant(test.args[1])
    if bound is None:
        raise Unsupported("tokens are numbered per expert and compared with something other than a constant "
                          "capacity")
    limit = bound - offset
    return max(0, math.floor(limit) if CAPACITY_TESTS[test.target] == "le" else math.ceil(limit) - 1)


def _numbered_after_earlier(g: Reader, choices, tests) -> bool:
    """Each later choice's numbering adds the earlier choices' counts (GShard: all first choices first)."""
    for j, later in enumerate(choices[1:], 1):
        own = [t for t in tests if g.depends(t, later)]
        cut = nx.restricted_view(g.dag, [later], [])
        if not own or not all(nx.has_path(cut, choices[j - 1], t) for t in own):
            return False
    return True


def _renormalization(g: Reader, choices, tests, combine) -> str:
    """"before", "after" (capacity drops) or "": a division of a choice's score by a sum over the choices."""
    for n in g.rec.graph.nodes:
        if n.target not in (aten.div.Tensor, aten.div_.Tensor) or not isinstance(n.args[1], fx.Node) or \
                not g.depends(combine, n):
            continue
        den = n.args[1]
        while den.target in GUARDS and isinstance(den.args[0], fx.Node) and \
                not (den.target is aten.add.Tensor and isinstance(den.args[1], fx.Node)):
            den = den.args[0]
        if sum(g.depends(den, c) for c in choices) == len(choices) and shape(den)[:1] == shape(n)[:1]:
            return "after" if any(g.depends(den, t) for t in tests) else "before"
    return ""


def _threshold(g: Reader, choices, tests, dispatch) -> float | None:
    """The bound a later choice's weight must exceed to be dispatched (GShard's threshold policy)."""
    found = [n for n in g.rec.graph.nodes if n.target in THRESHOLDS and g.depends(dispatch, n)
             and constant(n.args[1]) is not None and _count_of(g, n) is None]
    if not found:
        return None
    if any(not any(g.depends(n, c) for c in choices[1:]) for n in found):
        raise Unsupported("the first choice is dispatched only above a threshold; a threshold on later "
                          "choices is understood")
    values = {constant(n.args[1]) for n in found}
    if len(values) > 1:
        raise Unsupported(f"later choices are held to different thresholds ({sorted(values)})")
    return values.pop()


# ---- the capacity rule: the capacity read at other token counts ---------------------------------------------
PROBE_SHARE = 4      # the probe's even share of slots per expert, in capacities: a factor of 1/4 or more shows
PROBE_TOKENS = 2048  # the most tokens per group the probe takes (its recording keeps every value it computes)


def capacities_at(g: Reader, block, points: dict[int, int], per_group, top_k: int, E: int) -> dict[int, int]:
    """Tokens per capacity group → capacity: the recorded call's (`points`, one), and the block's re-recorded
    at twice and at one token per sequence (when its input is the hidden states alone), where the rule for
    other calls is read from. When those agree, once more at a size whose even share of slots per expert,
    k·G/E, is PROBE_SHARE times that capacity: a minimum capacity that binds at every size recorded so far
    (max(minimum, ⌈k·factor·G/E⌉) at small G) would otherwise read as a constant."""
    if len(g.rec.inputs) != 1:
        return points
    xv = g.rec.inputs[0].meta["val"]
    dim = -2 if xv.dim() > 2 else 0

    def at(copies: int | None) -> bool:  # the capacity on xv repeated (None: cut to one token); False: not run
        other = xv.narrow(dim, 0, 1) if copies is None else torch.cat([xv] * copies, dim)
        try:
            again = Reader(record(block, (other,), {}), g.names)
        except Exception:  # the block takes more than its hidden states, or not this many: what was read it is
            return False
        found = recorded_capacities(again)
        if len(found) == 1:
            points[per_group(tuple(other.shape))] = found.pop()
        return True

    ((group, capacity),) = points.items()
    if not (at(2) and at(None)) or len(set(points.values())) > 1:
        return points
    copies = math.ceil(PROBE_SHARE * capacity * E / (top_k * max(group, 1)))
    probe = list(xv.shape)
    probe[dim] *= copies
    if copies > 2 and group < per_group(tuple(probe)) <= PROBE_TOKENS:  # (a fixed group does not grow)
        at(copies)
    return points


# ---- the capacity rule ---------------------------------------------------------------------------------------
def capacity_rule(points: dict[int, int], top_k: int, E: int) -> tuple[float, int]:
    """(factor, min_capacity) with max(min_capacity, ⌈k·factor·T/E⌉) = C at every (T, C) of `points`, the
    factor the simplest fraction that does; (0, 0) when C does not change with T (a constant capacity)."""
    if len(set(points.values())) == 1:
        return 0.0, 0
    by_t = sorted(points.items())
    for floor in (0, by_t[0][1]):
        lo, hi = Fraction(0), Fraction(10 ** 6)
        for T, C in by_t:
            if C <= floor:
                continue
            scale = Fraction(E, top_k * T)  # ⌈k·f·T/E⌉ = C  ⟺  f ∈ ((C − 1)·E/(kT), C·E/(kT)]
            lo, hi = max(lo, (C - 1) * scale), min(hi, C * scale)
        f = _simplest_in(lo, hi)
        if f is not None and all(max(floor, math.ceil(top_k * f * T / E)) == C for T, C in by_t):
            return float(f), floor
    seen = ", ".join(f"{c} for {t} tokens" for t, c in by_t)
    raise Unsupported(f"the capacity changes with the number of tokens ({seen}) by a rule other than "
                      "max(minimum, ⌈k · factor · tokens / experts⌉)")


def _simplest_in(lo: Fraction, hi: Fraction) -> Fraction | None:
    """The fraction of smallest denominator in (lo, hi]."""
    for q in range(1, 1001):
        p = math.floor(hi * q)
        if Fraction(p, q) > lo:
            return Fraction(p, q)
    return None


# ---- the auxiliary loss --------------------------------------------------------------------------------------
def read_aux(g: Reader, out: fx.Node, router_mm: fx.Node, first: fx.Node, tests, group: int) -> AuxLossSpec:
    """AuxLossSpec of a scalar output: its terms (an add tree) told apart by dataflow (the z-loss reads a
    logsumexp of the logits, the balancing loss the first choice; per group when a mean or sum over the
    tokens leaves [groups, E]), each term's weight by its recorded value against the unweighted loss on the
    recorded logits (`group` tokens per capacity group)."""
    logits = router_mm.meta["val"].reshape(-1, shape(router_mm)[-1]).float()
    firsts = FIRST_CHOICE[first.target](first.meta["val"])                                       # [T]
    terms, todo = [], [out]
    while todo:
        n = todo.pop()
        if n.target is aten.add.Tensor and all(isinstance(a, fx.Node) and shape(a) == () for a in n.args[:2]):
            todo += n.args[:2]
        else:
            terms.append(n)
    balance, z, grouped = 0.0, 0.0, False
    for term in terms:
        lse = any(m.target is aten.logsumexp.default for m in g.between(router_mm, term))
        if lse and not g.depends(term, first):
            unit = aux_loss(AuxLossSpec(z=1.0), logits, firsts.reshape(-1))
            z += float(term.meta["val"]) / float(unit)
        elif g.depends(term, first) and not lse:
            if any(g.depends(term, t) for t in tests):
                raise Unsupported("the balancing loss counts the tokens kept after capacity drops; counting each "
                                  "token's first choice (GShard, Switch) is understood")
            grouped = any(n.target in (aten.mean.dim, aten.sum.dim_IntList) and len(shape(n)) > 1
                          and shape(n)[-1] == logits.shape[-1] for n in g.between(first, term))
            unit = aux_loss(AuxLossSpec(balance=1.0, grouped=grouped), logits, firsts.reshape(-1), group)
            balance += float(term.meta["val"]) / float(unit)
        else:
            raise Unsupported("the auxiliary loss has a term other than a balancing loss on the first choices "
                              "and the router z-loss")
    return AuxLossSpec(float(f"{balance:.7g}"), float(f"{z:.7g}"), balance != 0 and grouped)


def is_first_choice_count(g: Reader, out: fx.Node, first: fx.Node, E: int) -> bool:
    """Whether a block output is the number of tokens whose first choice is each expert, before capacity
    drops ([E] integers, as GShard-style gates return for logging): by dataflow, and by its recorded value."""
    val = out.meta.get("val")
    if shape(out) != (E,) or val.is_floating_point() or not g.depends(out, first):
        return False
    firsts = FIRST_CHOICE[first.target](first.meta["val"]).reshape(-1)
    return torch.equal(val.long(), torch.bincount(firsts, minlength=E))
