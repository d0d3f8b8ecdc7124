"""The shared training loop's batch stream: first epoch streamed, later epochs replayed from memory.

The stream is fed by a stand-in for Ray Train's dataset shard (it only needs `iter_torch_batches`);
the real shard path runs in the 2-worker training tests.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ray_jobs.training import loop


class _Shard:
    """Counts how many epochs were requested from it, like a streaming split would start them."""

    def __init__(self, num_rows: int):
        self.rows = torch.arange(num_rows, dtype=torch.float32)
        self.epochs = 0

    def iter_torch_batches(self, batch_size: int, drop_last: bool):
        self.epochs += 1
        for start in range(0, len(self.rows), batch_size):
            chunk = self.rows[start:start + batch_size]
            if drop_last and len(chunk) < batch_size:
                return
            yield {"x": chunk.clone(), "dropped": chunk.clone()}


def _stream(monkeypatch, shard: _Shard, cache_mb: float):
    import ray.train

    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: shard)
    return loop._batches(4, ["x"], cache_mb, torch.Generator().manual_seed(0))


def test_small_shard_replays_reshuffled_epochs_from_memory(monkeypatch):
    shard = _Shard(10)
    batches = list(itertools.islice(_stream(monkeypatch, shard, cache_mb=1), 12))
    assert shard.epochs == 1  # one streamed epoch, then memory
    assert all(set(b) == {"x"} and b["x"].shape == (4,) for b in batches)
    assert torch.equal(torch.cat([b["x"] for b in batches[:2]]), torch.arange(8.0))  # epoch 1 in order
    replayed = torch.cat([b["x"] for b in batches[2:]])
    epochs = replayed.view(-1, 8)  # 10 rows -> 2 full batches (8 rows) per epoch
    assert all(len(set(e.tolist())) == 8 for e in epochs)  # no row twice within an epoch
    assert set(replayed.tolist()) == set(range(10))  # the rows epoch 1 left over come back later
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # a fresh order per epoch


def test_cache_off_streams_every_epoch(monkeypatch):
    shard = _Shard(10)
    batches = list(itertools.islice(_stream(monkeypatch, shard, cache_mb=0), 6))
    assert shard.epochs == 3
    assert [b["x"].tolist() for b in batches[2:4]] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_shard_smaller_than_a_batch_is_a_clear_error(monkeypatch):
    with pytest.raises(RuntimeError, match="fewer than batch_size=4"):
        next(_stream(monkeypatch, _Shard(3), cache_mb=1))
