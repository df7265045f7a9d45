"""The global epoch plan: pure arithmetic, so checked exhaustively on small cases."""
import numpy as np
import pytest

from data_pipeline.stream.plan import EpochPlan, RankSchedule, complement, merge_intervals, rho_to_sigma, split_batch


def test_plan_is_a_permutation_and_a_pure_function_of_its_inputs():
    counts = [10, 3, 0, 25, 7]
    a = EpochPlan(counts, seed=1, source=0, epoch=2, window=8)
    raw = a.raw(np.arange(a.total))
    assert sorted(raw.tolist()) == list(range(sum(counts)))
    assert np.array_equal(raw, EpochPlan(counts, 1, 0, 2, 8).raw(np.arange(a.total)))
    assert not np.array_equal(raw, EpochPlan(counts, 1, 0, 3, 8).raw(np.arange(a.total)))
    assert not np.array_equal(raw, EpochPlan(counts, 1, 1, 2, 8).raw(np.arange(a.total)))
    # Windows permute only inside themselves.
    assert all(set(raw[w:w + 8].tolist()) == set(range(w, min(w + 8, a.total))) for w in range(0, a.total, 8))
    # locate() inverts the shard-order numbering.
    for r in range(a.total):
        j, i = a.locate(r)
        assert 0 <= i < counts[a.shards[j]] and a.offsets[j] + i == r


def test_resampled_epochs_draw_shards_with_replacement():
    plans = [EpochPlan([5] * 20, seed=0, source=0, epoch=e, window=4, resampled=True) for e in range(5)]
    assert any(len(set(p.shards.tolist())) < 20 for p in plans)


def test_intervals():
    assert merge_intervals([(5, 7), (0, 2), (2, 3), (6, 9), (4, 4)]) == [(0, 3), (5, 9)]
    assert complement([(0, 3), (5, 9)], 12) == [(3, 5), (9, 12)]
    assert rho_to_sigma([(3, 5), (9, 12)], 1, 4).tolist() == [4, 9, 10]


@pytest.mark.parametrize("weights", [[1.0], [3.0, 1.0], [0.5, 0.3, 0.2], [0.97, 0.03]])
@pytest.mark.parametrize("world", [1, 3])
def test_split_batch_tracks_the_weights(weights, world):
    taken, total, b = [0] * len(weights), 0, 10
    for _ in range(300):
        counts = split_batch(b, [w / sum(weights) for w in weights], taken, total, world)
        assert sum(counts) == b and min(counts) >= 0
        taken = [t + c * world for t, c in zip(taken, counts)]
        total += b * world
    observed = np.array(taken) / total
    assert np.allclose(observed, np.array(weights) / sum(weights), atol=1.0 / 300)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_ranks_cover_an_epoch_once_with_equal_batches(world):
    counts = [10, 25, 40, 55, 70, 85, 89]  # uneven shards
    b = 4
    schedules = [RankSchedule([counts], [1.0], b, seed=3, window=16, resampled=False, rank=r, world_size=world)
                 for r in range(world)]
    n = sum(counts)
    steps = (n // world) // b
    seen = [np.concatenate([sig for _, _, sig in s.next()]) for s in schedules for _ in range(steps)]
    flat = np.concatenate(seen)
    assert len(flat) == len(np.unique(flat)) == steps * b * world
    states = [s.state() for s in schedules]
    assert all(st == states[0] for st in states), "every rank derives the same global state"


def test_resume_under_another_world_size_continues_the_epoch():
    counts = [7, 13, 20, 30, 50]  # 120 samples
    b_first, world_first = 6, 2
    first = [RankSchedule([counts], [1.0], b_first, seed=0, window=10, resampled=False, rank=r,
                          world_size=world_first) for r in range(world_first)]
    taken = [np.concatenate([sig for _, _, sig in s.next()]) for s in first for _ in range(4)]
    state = first[0].state()
    world = 3
    rest = [RankSchedule([counts], [1.0], 4, seed=0, window=10, resampled=False, rank=r, world_size=world,
                         state=state, total=first[0].total) for r in range(world)]
    remaining = 120 - 48
    taken += [np.concatenate([sig for _, _, sig in s.next()]) for s in rest for _ in range(remaining // 12)]
    flat = np.concatenate(taken)
    assert sorted(flat.tolist()) == list(range(120))
    assert all(s.state()[0]["consumed"] == [0, 120] for s in rest)
