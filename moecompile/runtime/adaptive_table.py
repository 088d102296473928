"""Tutel's adaptive dictionary: per MoE layer, the step's capacity bucket ⌊c/R⌋ → the best (parallelism r,
pipelining degree, all-to-all algorithm), filled by the cost model and corrected by measured trials.

    c        = the most rows any expert gets from any one rank this step (from every rank's counts [W, E])
    new key  → the cost model predicts every candidate for the step's load [W, E]; measured, `calls` training
               calls each (the layer's forward + backward seconds): each r at its best-predicted degree,
               unless predicted more than `cutoff` times the best (every plausible parallelism is tried, as
               Tutel's search over r measures them: the model ranks pipelining degrees better than
               parallelisms, whose costs at small sizes it sees least well), then up to `extra` more of
               those predicted within `slack` of the best
    measured → the group agrees on each trial's slowest-rank median and keeps the fastest for the key
    no grad  → the key's choice if it has one, else the predicted best (nothing is measured)
Every rank sees the same keys in the same order and measures the same candidates, so every collective
(the runtime's, and the agreement here) matches across ranks.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist


@dataclass(frozen=True, order=True)
class Choice:
    r: int
    degree: int
    algorithm: str = "linear"

    def __str__(self) -> str:
        return f"r={self.r} d={self.degree}" + ("" if self.algorithm == "linear" else f" {self.algorithm}")


@dataclass
class Entry:
    """One capacity bucket: what the cost model predicted, what was measured, what was chosen."""
    predicted: dict[Choice, float]
    trials: list[Choice]
    samples: dict[Choice, list[float]] = field(default_factory=dict)
    measured: dict[Choice, float] = field(default_factory=dict)
    chosen: Choice | None = None

    def next_trial(self, calls: int) -> Choice | None:
        return next((c for c in self.trials if len(self.samples.get(c, ())) < calls), None)


@dataclass
class AdaptiveTable:
    predict: Callable[[torch.Tensor], dict[Choice, float]]  # load [W, E] → predicted seconds (collective: agreed)
    group: object
    window: int = 128                              # R: capacities per bucket
    extra: int = 1                                 # candidates measured beyond each r's best, at most...
    slack: float = 1.25                            # ... of those predicted within this factor of the best
    cutoff: float = 2.0                            # an r predicted slower than this factor of the best: not tried
    calls: int = 2                                 # training calls measured per candidate
    entries: dict[int, Entry] = field(default_factory=dict)

    def pick(self, load: torch.Tensor, training: bool) -> tuple[int, Choice]:
        """(bucket, the choice for this call), for a step whose rank q dispatches load[q, e] rows to expert e
        (the same [W, E] on every rank)."""
        key = int(load.max()) // self.window
        entry = self.entries.get(key)
        if entry is None:
            predicted = self.predict(load)
            ranked = sorted(predicted, key=lambda c: (predicted[c], c))
            best = predicted[ranked[0]]
            trials = [c for c in {c.r: c for c in reversed(ranked)}.values()            # each r's best
                      if predicted[c] <= self.cutoff * best]
            trials += [c for c in ranked if c not in trials and predicted[c] <= self.slack * best][:self.extra]
            entry = self.entries[key] = Entry(predicted, sorted(trials, key=ranked.index))
        if entry.chosen is not None:
            return key, entry.chosen
        return key, entry.next_trial(self.calls) if training else entry.trials[0]

    def record(self, key: int, choice: Choice, seconds: float) -> None:
        """A training call at `choice` took `seconds`; when the bucket's trials are all measured, choose."""
        entry = self.entries[key]
        if entry.chosen is not None:
            return
        entry.samples.setdefault(choice, []).append(seconds)
        if entry.next_trial(self.calls) is None:
            medians = torch.tensor([statistics.median(entry.samples[c]) for c in entry.trials], dtype=torch.float64)
            dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=self.group)
            entry.measured = dict(zip(entry.trials, medians.tolist()))
            entry.chosen = min(entry.measured, key=lambda c: (entry.measured[c], c))

    def summary(self) -> str:
        parts = []
        for key, e in sorted(self.entries.items()):
            span = f"c {key * self.window}..{(key + 1) * self.window - 1}"
            if e.chosen is None:
                parts.append(f"{span}: measuring {', '.join(map(str, e.trials))}")
                continue
            measured = ", ".join(f"{c} {s * 1e3:.1f} (predicted {e.predicted[c] * 1e3:.1f})"
                                 for c, s in e.measured.items())
            parts.append(f"{span}: {e.chosen} (measured ms fwd+bwd: {measured}; of {len(e.predicted)} candidates)")
        return "; ".join(parts) or "empty"
