"""runtime.spawn.run_ranks: results in rank order, the first failure's traceback, the deadline."""
import time

import pytest
import torch
import torch.distributed as dist

from moecompile.runtime.spawn import RankFailed, run_ranks


def _rank_and_sum(rank, world):
    t = torch.tensor([rank + 1])
    dist.all_reduce(t)
    return rank, int(t)


def _fails_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank 1 gives up")
    dist.barrier()  # rank 0 waits for a peer that is gone: its error follows from rank 1's


def _sleeps(rank, world):
    time.sleep(60)


def test_results_come_back_in_rank_order():
    assert run_ranks(_rank_and_sum, 2) == [(0, 3), (1, 3)]


def test_the_first_failure_is_raised_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed:.*ValueError: rank 1 gives up"):
        run_ranks(_fails_on_rank_1, 2, timeout_s=30)


def test_ranks_past_their_deadline_are_ended():
    began = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish within 5 s"):
        run_ranks(_sleeps, 2, deadline_s=5)
    assert time.monotonic() - began < 30
