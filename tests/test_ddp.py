"""Two-process CPU (gloo) DDP: gathered loss and gradients equal the single-process full-batch ones."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.helpers import DDPWrap as _Wrap, free_port as _free_port, tiny_batch, tiny_model

WORLD = 2
N = 8  # global batch
GROUPS = [0, 1, 2, 3, 0, 5, 6, 3]  # duplicates that sit on different ranks (0↔4, 3↔7)



def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for symmetric in (False, True):
            _one_case(rank, symmetric, out_dir)
    finally:
        dist.destroy_process_group()


def _one_case(rank: int, symmetric: bool, out_dir: str) -> None:
    model = tiny_model(symmetric=symmetric)
    ddp = DDP(_Wrap(model))
    full = tiny_batch(N, groups=GROUPS)
    local = {k: v[rank * N // WORLD:(rank + 1) * N // WORLD] for k, v in full.items()}
    loss = ddp(local)
    loss.backward()  # DDP averages gradients over ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": total / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}_{symmetric}.pt"))


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("symmetric", [False, True])
def test_gathered_loss_and_grads_equal_full_batch(ddp_results, symmetric):
    model = tiny_model(symmetric=symmetric)
    loss, _ = model.contrastive_step(tiny_batch(N, groups=GROUPS))
    loss.backward()
    for rank in range(WORLD):
        res = torch.load(ddp_results / f"rank{rank}_{symmetric}.pt")
        torch.testing.assert_close(res["loss"], loss.detach(), rtol=1e-10, atol=1e-12)
        for name, p in model.named_parameters():
            if p.grad is None:
                continue
            torch.testing.assert_close(res["grads"][name], p.grad, rtol=1e-8, atol=1e-10, msg=name)


def test_local_only_loss_differs_from_full_batch():
    """Sanity check that the test can fail: half a batch sees fewer negatives and a different loss."""
    model = tiny_model()
    full, _ = model.contrastive_step(tiny_batch(N, groups=GROUPS))
    half_batch = {k: v[: N // 2] for k, v in tiny_batch(N, groups=GROUPS).items()}
    half, _ = model.contrastive_step(half_batch)
    assert not torch.allclose(full, half)
