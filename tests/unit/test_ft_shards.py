"""Live recovery under HSDP (pretrain/engines/ft.py): a peer sends each rank's local shards as plain
tensors, and the group that recovers puts them back into DTensors laid out like its own, refusing shards
of another shape (groups of another size) with one line."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from pretrain.config import ConfigError
from pretrain.engines.ft import into_shards, local_shards


@pytest.fixture
def mesh():
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (dist.get_world_size(),))
    finally:
        if started:
            dist.destroy_process_group()


def test_local_shards_round_trip_into_the_receivers_layout(mesh):
    weight = distribute_tensor(torch.arange(15.0).reshape(5, 3), mesh, [Shard(0)])
    optim = {"state": {0: {"exp_avg": weight * 2, "step": torch.tensor(3.0)}},
             "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    sent = local_shards({"model": {"w": weight}, "optim": optim})
    leaves = [sent["model"]["w"], sent["optim"]["state"][0]["exp_avg"]]
    assert not any(isinstance(t, DTensor) for t in leaves)  # nothing of a mesh travels
    assert torch.equal(leaves[1], weight.to_local() * 2)

    template = distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])  # the replacement's fresh state
    back = into_shards({"model": {"w": template}, "optim": {"state": {0: {"exp_avg": template,
                                                                          "step": torch.tensor(0.0)}}}}, sent)
    restored = back["optim"]["state"][0]["exp_avg"]
    assert isinstance(restored, DTensor) and restored.placements == template.placements
    assert torch.equal(restored.full_tensor(), torch.arange(15.0).reshape(5, 3) * 2)
    assert back["optim"]["state"][0]["step"].item() == 3.0 and back["optim"]["param_groups"][0]["lr"] == 0.1


def test_a_shard_of_another_shape_is_refused_in_one_line(mesh):
    template = distribute_tensor(torch.zeros(5, 3), mesh, [Shard(0)])
    with pytest.raises(ConfigError, match="every replica group needs the same number of ranks"):
        into_shards({"w": template}, {"w": torch.zeros(3, 3)})  # a peer group of another size sharded it
