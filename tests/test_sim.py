"""The cluster simulator (moecompile.sim) and the all-to-all time model it shares with the runtime."""
import math

import pytest

from moecompile.runtime.cost_model import LinkRates, all_to_all_seconds, best_all_to_all

NVLINK = LinkRates(latency_s=5e-6, bandwidth_Bps=300e9)
IB = LinkRates(latency_s=10e-6, bandwidth_Bps=25e9)
COPY = 1e12


def test_linear_all_to_all_is_its_formula():
    # 2 nodes × 8: 7 NVLink messages and 8 network messages of S/16; the network side is the slower one
    s = 16 << 20
    expected = max(7 * (5e-6 + s / 16 / 300e9), 8 * (10e-6 + s / 16 / 25e9))
    assert all_to_all_seconds("linear", s, 2, 8, NVLINK, IB, COPY) == pytest.approx(expected, rel=1e-12)
    # one rank: nothing to send
    assert all_to_all_seconds("linear", s, 1, 1, NVLINK, IB, COPY) == 0.0


def test_2dh_is_its_four_phases():
    s, nodes, per_node = 8 << 20, 4, 8
    expected = 2 * s / COPY + 7 * (5e-6 + s / 8 / 300e9) + 3 * (10e-6 + s / 4 / 25e9)
    assert all_to_all_seconds("2dh", s, nodes, per_node, NVLINK, IB, COPY) == pytest.approx(expected, rel=1e-12)


def test_2dh_wins_at_many_nodes_with_small_messages_and_loses_on_one_node():
    small = 1 << 20                           # 1 MiB per rank: 4 KiB messages at 256 GPUs
    linear = all_to_all_seconds("linear", small, 32, 8, NVLINK, IB, COPY)
    hier = all_to_all_seconds("2dh", small, 32, 8, NVLINK, IB, COPY)
    assert hier < linear / 4                  # 38 network messages instead of 248
    assert best_all_to_all(small, 32, 8, NVLINK, IB, COPY)[0] == "2dh"
    for size in (small, 1 << 30):             # one node: no network phase to shrink, only copies to add
        assert all_to_all_seconds("linear", size, 1, 8, NVLINK, IB, COPY) < \
            all_to_all_seconds("2dh", size, 1, 8, NVLINK, IB, COPY)
        assert best_all_to_all(size, 1, 8, NVLINK, IB, COPY)[0] == "linear"
    # large messages at small scale: 2dh's extra intra-node phase costs more than its fewer messages save
    assert best_all_to_all(1 << 30, 2, 8, NVLINK, IB, COPY)[0] == "linear"


def test_all_to_all_rejects_unknown_algorithms_and_empty_clusters():
    with pytest.raises(ValueError, match="unknown all-to-all"):
        all_to_all_seconds("ring", 1.0, 2, 8, NVLINK, IB, COPY)
    with pytest.raises(ValueError, match="at least one node"):
        all_to_all_seconds("linear", 1.0, 0, 8, NVLINK, IB, COPY)


# ---- the simulator ---------------------------------------------------------------------------------------------
from moecompile.passes.schedule_overlap import chunk_dag, list_schedule  # noqa: E402
from moecompile.sim import (a2a_share, checkpoint_bytes, checkpoint_cost, match_a2a_share,  # noqa: E402
                            pec_sim_cluster, replay_layer, replay_pair)
from moecompile.sim.calibrate import fit, measure  # noqa: E402
from moecompile.sim.checkpoint import PEC_SIM_K, PEC_SIM_MODEL  # noqa: E402
from moecompile.sim.cluster import A800_NVLINK, IB_LATENCY_S, NDM_A100_V4  # noqa: E402
from moecompile.sim.model import GPT2_MOE_SMALL, tutel_table2  # noqa: E402
from moecompile.sim.replay import a2a_seconds, layer_dag, op_seconds  # noqa: E402


def test_layer_replay_is_the_scheduler_makespan():
    cfg, cluster = tutel_table2(16), NDM_A100_V4
    ops = op_seconds(cfg, cluster)
    for n in (1, 2, 4):
        send = a2a_seconds(cfg, cluster, n)
        bare = dict(ops, gate=0.0, encode=0.0, decode=0.0)        # nothing but the overlap pass's chunk DAG
        own = max(s.end_s for s in list_schedule(chunk_dag(n, send, ops["experts"] / n)))
        assert max(s.end_s for s in list_schedule(layer_dag(n, send, bare))) == pytest.approx(own, rel=1e-12)
    # one chunk: nothing overlaps, forward is the sum of its nodes; backward doubles the GEMMs
    r = replay_layer(cfg, cluster, 1)
    send = a2a_seconds(cfg, cluster, 1)
    assert r.forward_s == pytest.approx(sum(ops[k] for k in ("gate", "encode", "experts", "decode")) + 2 * send)
    assert r.backward_s == pytest.approx(2 * (ops["gate"] + ops["experts"]) + ops["encode"] + ops["decode"]
                                         + 2 * send)
    assert r.exposed_comm_s == pytest.approx(r.comm_s) and r.overlap == pytest.approx(0.0, abs=1e-12)


def test_tutel_setting_a2a_is_the_network_bound_and_its_share_grows_with_gpus():
    # 16 GPUs = 2 nodes: each a2a sends 8 messages of 2 GiB / 16 over 25 GB/s of InfiniBand; 4 per fwd+bwd
    r16 = replay_layer(tutel_table2(16), NDM_A100_V4.with_world(16))
    assert r16.comm_s == pytest.approx(4 * 8 * (IB_LATENCY_S + 2 ** 31 / 16 / 25e9), rel=1e-9)
    shares = [a2a_share(tutel_table2(g), NDM_A100_V4.with_world(g)) for g in (16, 64, 256)]
    assert shares == sorted(shares) and shares[0] == pytest.approx(0.332, abs=0.005)
    assert 0.45 < shares[2] < 0.55


def test_scmoe_hides_its_all_to_all_on_nvlink_and_top2_does_not():
    top2 = replay_pair(GPT2_MOE_SMALL, A800_NVLINK, "top2", 1)
    scmoe = replay_pair(GPT2_MOE_SMALL, A800_NVLINK, "scmoe", None)
    assert top2.overlap == pytest.approx(0.0, abs=1e-12) and scmoe.overlap == pytest.approx(1.0)
    assert 1.1 < top2.total_s / scmoe.total_s < 1.5
    matched, factor = match_a2a_share(GPT2_MOE_SMALL, A800_NVLINK, 0.15)
    assert a2a_share(GPT2_MOE_SMALL, matched) == pytest.approx(0.15, abs=1e-6) and 0.5 < factor < 1.5


def test_pec_snapshot_hides_where_a_full_one_does_not():
    cfg = PEC_SIM_MODEL
    k = PEC_SIM_K / cfg.experts
    full_bytes = (cfg.non_expert_params() + cfg.expert_params()) * 14
    assert checkpoint_bytes(cfg) == full_bytes
    assert checkpoint_bytes(cfg, PEC_SIM_K) == (cfg.non_expert_params() + k * cfg.expert_params()) * 14
    a800 = pec_sim_cluster("A800")
    full = {g: checkpoint_cost(cfg, a800, g) for g in (128, 2048)}
    pec = checkpoint_cost(cfg, a800, 128, PEC_SIM_K)
    assert full[128].snapshot_s == pytest.approx(full_bytes / 128 / 1e9)          # 1 GB/s per GPU
    assert not full[128].overlaps and full[128].stall_s > 0.5                      # the crossover exists
    assert full[2048].overlaps and pec.overlaps and pec.hidden == 1.0
    assert pec.snapshot_s < full[128].snapshot_s * 0.2


def test_calibration_on_this_machine_gives_finite_errors():
    cluster, rows = fit(measure(scale=0.25, rounds=1), scale=0.25)
    assert {r.term for r in rows} == {"compute", "memory", "link", "end to end"}
    assert all(math.isfinite(r.error) and r.measured_s > 0 for r in rows)
    assert all(abs(r.error) < 1e-9 for r in rows if r.fitted and r.term != "link")   # fitted exactly
    assert cluster.device.gemm_efficiency > 0 and cluster.intra.bandwidth_Bps > 0
