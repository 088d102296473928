"""moecompile.sim: the cost model and the overlap pass's scheduler replayed on a described cluster.

    cluster.py     Device, Cluster and the presets (A100 NDm v4 as in Tutel, A30 PCIe, A800 NVLink, the PEC
                   paper's simulated A800/H100), from public spec sheets
    model.py       MoEConfig: the sizes of a model, and the papers' configurations
    replay.py      an MoE layer or a block pair (top-2, top-1, shared expert, ScMoE) as a DAG of timed nodes,
                   scheduled by passes.schedule_overlap.list_schedule
    checkpoint.py  full vs PEC checkpoints: bytes, snapshot, whether it hides behind an iteration
    calibrate.py   this machine as a cluster, measured, with the error of every term
Everything here is a model prediction; only calibrate.py measures. `moecompile bench sim` prints the tables.
"""
from moecompile.sim.checkpoint import checkpoint_bytes, checkpoint_cost, iteration_seconds
from moecompile.sim.cluster import PRESETS, Cluster, Device, pec_sim_cluster
from moecompile.sim.model import MoEConfig
from moecompile.sim.replay import Replay, a2a_share, match_a2a_share, replay_layer, replay_pair

__all__ = ["Cluster", "Device", "MoEConfig", "PRESETS", "Replay", "a2a_share", "checkpoint_bytes",
           "checkpoint_cost", "iteration_seconds", "match_a2a_share", "pec_sim_cluster", "replay_layer",
           "replay_pair"]
