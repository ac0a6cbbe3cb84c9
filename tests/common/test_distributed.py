import pytest
import torch

from common.distributed import (
    ParallelDims,
    any_rank,
    build_mesh,
    global_max,
    global_sum,
    init_distributed,
    rank_and_world,
    rank_share,
)
from tests.multiproc import run_on_ranks


def test_parallel_dims_fill_dp_shard_and_reject_bad_layouts():
    assert ParallelDims(cp=2).resolve(8) == ParallelDims(1, 4, 2, 1)
    assert ParallelDims(dp_replicate=2, pair=2).resolve(8).dp_shard == 2
    with pytest.raises(ValueError, match="not divisible by dp_replicate\\*cp\\*pair"):
        ParallelDims(cp=3).resolve(8)
    with pytest.raises(ValueError, match="does not equal the world size 8"):
        ParallelDims(dp_shard=2, cp=2).resolve(8)
    with pytest.raises(ValueError, match="pair must be 1 or 2"):
        ParallelDims(pair=4).resolve(8)


def test_single_process_without_launcher(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)


def _mesh_worker(rank, world):
    info = init_distributed()
    mesh = build_mesh(ParallelDims(pair=2))
    x = torch.tensor([float(rank)])
    torch.distributed.all_reduce(x, group=mesh["pair"].get_group())
    reductions = (rank_and_world(), global_sum(rank + 0.5), global_max(10.0 * rank),
                  any_rank(rank == 1), any_rank(False))
    return info.backend, mesh.mesh_dim_names, mesh["dp_shard"].size(), mesh["pair"].size(), x.item(), reductions


def test_build_mesh_and_reductions_on_two_ranks():
    results = run_on_ranks(_mesh_worker, 2)
    for rank, (backend, names, dp, pair, total, reductions) in enumerate(results):
        assert backend == "gloo" and names == ("dp_replicate", "dp_shard", "pair", "cp")
        assert (dp, pair, total) == (1, 2, 1.0)
        assert reductions == ((rank, 2), 2.0, 10.0, True, False)


def test_single_process_reductions_are_the_value():
    assert rank_and_world() == (0, 1)
    assert (global_sum(2.5), global_max(-1.0), any_rank(True), any_rank(False)) == (2.5, -1.0, True, False)


def test_rank_share_deals_every_item_to_one_rank():
    items = list(range(7))
    shares = [rank_share(items, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="outside a world of 3"):
        rank_share(items, 3, 3)


def test_a_gloo_group_keeps_the_process_on_the_cpu(monkeypatch):
    """A test harness (or user) that started gloo on a GPU machine gets the CPU, not
    `cuda:LOCAL_RANK`, which gloo ranks sharing one GPU would fight over."""
    import torch.distributed as dist

    from tests.multiproc import _free_port

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail(f"set_device({device})"))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        info = init_distributed()
        assert info.device == torch.device("cpu") and info.backend == "gloo"
    finally:
        dist.destroy_process_group()
