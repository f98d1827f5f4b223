"""MoCo-style memory queue (He et al. 2020) and momentum encoder: FIFO semantics, masking of stale
positives and duplicates, checkpointing, cached training, and identical queues under 2-process DDP."""
from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from contrastive.encoders import TransformerTextEncoder
from contrastive.losses import InfoNCELoss
from datamodules.codesearch.model import DualEncoderModule
from contrastive.models.queue import MemoryQueue
from tests.helpers import DDPWrap as _Wrap, free_port as _free_port, tiny_batch, tiny_model

GROUPS = [0, 1, 2, 3, 0, 5, 6, 3]


# ---------------------------------------------------------------------------------------------- MemoryQueue
def test_fifo_wraps_and_keeps_newest():
    q = MemoryQueue(size=5, dim=2)
    assert len(q) == 0 and q.contents()[0].shape == (0, 2)
    q.enqueue(torch.arange(6.).view(3, 2), torch.tensor([0, 1, 2]), torch.tensor([10, 11, 12]))
    emb, ids, groups = q.contents()
    assert ids.tolist() == [0, 1, 2] and groups.tolist() == [10, 11, 12] and len(q) == 3
    torch.testing.assert_close(emb, torch.arange(6.).view(3, 2))
    q.enqueue(torch.full((4, 2), 7.0), torch.tensor([3, 4, 5, 6]))  # groups default to ids
    emb, ids, groups = q.contents()
    assert ids.tolist() == [2, 3, 4, 5, 6] and groups.tolist() == [12, 3, 4, 5, 6] and len(q) == 5
    q.enqueue(torch.zeros(7, 2), torch.arange(20, 27))  # K > size keeps the last `size`
    assert q.contents()[1].tolist() == [22, 23, 24, 25, 26]
    q.reset()
    assert len(q) == 0


def test_enqueue_detaches_and_validates():
    q = MemoryQueue(4, 3)
    x = torch.randn(2, 3, requires_grad=True)
    q.enqueue(x * 2, torch.tensor([1, 2]))
    assert not q.contents()[0].requires_grad
    with pytest.raises(ValueError, match=r"\(K, 3\)"):
        q.enqueue(torch.randn(2, 4), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ids and groups"):
        q.enqueue(torch.randn(2, 3), torch.tensor([1]))
    with pytest.raises(ValueError, match="positive"):
        MemoryQueue(0, 3)


def test_state_dict_round_trip():
    q = MemoryQueue(4, 2)
    q.enqueue(torch.randn(6, 2), torch.arange(6), torch.arange(6) % 3)
    r = MemoryQueue(4, 2)
    r.load_state_dict(q.state_dict())
    for a, b in zip(q.contents(), r.contents()):
        torch.testing.assert_close(a, b)
    assert set(q.state_dict()) == {"embeddings", "ids", "groups", "ptr", "count"}


def test_masks_never_positive():
    pos, fn = MemoryQueue.masks(torch.tensor([1, 2]), torch.tensor([1, 7]), torch.tensor([1, 3, 7]),
                                torch.tensor([1, 7, 7]))
    assert not pos.any()
    assert fn.tolist() == [[True, False, False], [False, True, True]]
    _, fn = MemoryQueue.masks(torch.tensor([1, 2]), torch.tensor([1, 7]), torch.tensor([1, 3, 7]),
                              torch.tensor([1, 7, 7]), mask_known_duplicates=False)
    assert fn.tolist() == [[True, False, False], [False, False, False]]


# ---------------------------------------------------------------------------------------------- module
def test_stale_positive_copies_and_duplicates_are_masked():
    """Queue the batch's own documents: for each anchor, the stale copy of its own positive and the copies
    in its duplicate group are false negatives (masked), the other copies are ordinary negatives."""
    batch = tiny_batch(8, groups=GROUPS)
    model = tiny_model(queue_size=16)
    with torch.no_grad():
        k = model.encode_documents(batch["doc_ids"], batch["doc_mask"]) + 0.01
    ids, groups = batch["pair_id"], batch["dup_group"]
    model.queue.enqueue(k, ids, groups)
    loss, logs = model.contrastive_step(batch, enqueue=False)
    q = model.encode_queries(batch["query_ids"], batch["query_mask"])
    d = model.encode_documents(batch["doc_ids"], batch["doc_mask"])
    same_id, same_group = ids[:, None] == ids[None, :], groups[:, None] == groups[None, :]
    pos = torch.cat([same_id, torch.zeros_like(same_id)], 1)  # queued copies are never positives
    fn = torch.cat([same_group & ~same_id, same_group], 1)  # own stale positive + duplicates: masked
    expected = model.loss_fn(q, torch.cat([d, k]), pos, false_negative_mask=fn).loss
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert logs["queue_size"].item() == 8
    assert logs["masked_duplicates"].item() == pytest.approx((4 + 8 + 4) / 8)  # in-batch dups + stale + queued dups
    as_negatives = model.loss_fn(q, torch.cat([d, k]), pos,
                                 false_negative_mask=torch.cat([fn[:, :8], torch.zeros_like(same_id)], 1)).loss
    as_positives = model.loss_fn(q, torch.cat([d, k]), torch.cat([same_id, same_id], 1),
                                 false_negative_mask=torch.cat([fn[:, :8], same_group & ~same_id], 1)).loss
    assert not torch.allclose(loss, as_negatives) and not torch.allclose(loss, as_positives)


def test_queue_entries_are_extra_negatives():
    batch = tiny_batch(8, groups=GROUPS)
    model = tiny_model(queue_size=16)
    other = tiny_batch(5, seed=9)
    with torch.no_grad():
        k = model.encode_documents(other["doc_ids"], other["doc_mask"])
    model.queue.enqueue(k, other["pair_id"] + 50, other["pair_id"] + 50)
    loss, _ = model.contrastive_step(batch, enqueue=False)
    # the same thing written out by hand: candidates = in-batch docs + queued docs (no gradient)
    q = model.encode_queries(batch["query_ids"], batch["query_mask"])
    d = model.encode_documents(batch["doc_ids"], batch["doc_mask"])
    ids, groups = batch["pair_id"], batch["dup_group"]
    pos = torch.cat([ids[:, None] == ids[None, :], torch.zeros(8, 5, dtype=torch.bool)], 1)
    fn = torch.cat([(groups[:, None] == groups[None, :]) & ~pos[:, :8], torch.zeros(8, 5, dtype=torch.bool)], 1)
    expected = model.loss_fn(q, torch.cat([d, k]), pos, false_negative_mask=fn).loss
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    no_queue, _ = tiny_model().contrastive_step(batch)
    assert not torch.allclose(loss, no_queue)


def test_enqueue_only_in_training_and_fifo_across_steps():
    model = tiny_model(queue_size=12)
    b1, b2 = tiny_batch(8, seed=1), tiny_batch(8, seed=2)
    b2["pair_id"] = b2["pair_id"] + 8
    b2["dup_group"] = b2["dup_group"] + 8
    model.eval()
    model.contrastive_step(b1)
    assert len(model.queue) == 0
    model.train()
    model.contrastive_step(b1)
    model.contrastive_step(b2)
    emb, ids, _ = model.queue.contents()
    assert ids.tolist() == list(range(104, 116))
    with torch.no_grad():
        d2 = model.encode_documents(b2["doc_ids"], b2["doc_mask"])
    torch.testing.assert_close(emb[4:], d2)


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_cached_equals_plain_with_queue(momentum):
    batch = tiny_batch(8, groups=GROUPS)
    grads = {}
    for chunk in (None, 3):
        model = tiny_model(symmetric=True, queue_size=10, momentum=momentum, cache_chunk_size=chunk)
        other = tiny_batch(6, seed=4)
        with torch.no_grad():
            model.queue.enqueue(model.encode_documents(other["doc_ids"], other["doc_mask"]),
                                torch.tensor([100, 101, 300, 301, 302, 303]),  # two stale positives
                                torch.tensor([100, 101, 300, 301, 302, 103]))  # and a duplicate of 103
        if chunk is None:
            loss, _ = model.contrastive_step(batch)
            loss.backward()
        else:
            surrogate, loss, _ = model.gradcache_step(batch)
            surrogate.backward()
        grads[chunk] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        model.queue.contents())
    torch.testing.assert_close(grads[3][0], grads[None][0], rtol=1e-10, atol=1e-12)
    assert grads[3][1].keys() == grads[None][1].keys()
    for n in grads[None][1]:
        torch.testing.assert_close(grads[3][1][n], grads[None][1][n], rtol=1e-8, atol=1e-10, msg=n)
    for a, b in zip(grads[3][2], grads[None][2]):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- momentum
def test_momentum_needs_shared_tower_and_valid_m():
    enc = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
    enc2 = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
    with pytest.raises(ValueError, match="shared tower"):
        DualEncoderModule(enc, InfoNCELoss(), doc_encoder=enc2, momentum=0.99)
    with pytest.raises(ValueError, match="momentum must be in"):
        DualEncoderModule(enc, InfoNCELoss(), momentum=1.5)
    with pytest.raises(ValueError, match="queue_size"):
        DualEncoderModule(enc, InfoNCELoss(), queue_size=-1)


def test_momentum_keys_have_no_gradient_and_ema_update():
    model = tiny_model(momentum=0.75, queue_size=8)
    assert all(not p.requires_grad for p in model.momentum_tower.parameters())
    assert not any(n.startswith("momentum_tower") for n, p in model.named_parameters() if p.requires_grad)
    batch = tiny_batch(8)
    d = model.encode_keys({"ids": batch["doc_ids"], "mask": batch["doc_mask"]})
    assert not d.requires_grad
    with torch.no_grad():
        for p in model.doc_tower.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.momentum_tower.parameters()]
    model.update_momentum_encoder()
    for pk, p, b in zip(model.momentum_tower.parameters(), model.doc_tower.parameters(), before):
        torch.testing.assert_close(pk, 0.75 * b + 0.25 * p)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.batches = []
        for i in range(n):
            b = tiny_batch(8, seed=20 + i)
            b["pair_id"] = b["pair_id"] + 8 * i
            b["dup_group"] = b["pair_id"].clone()
            self.batches.append(b)

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _fit(model, steps: int, tmp_path=None, **kw) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, precision="64-true",
                        default_root_dir=tmp_path, **kw)
    trainer.fit(model, torch.utils.data.DataLoader(_Data(steps * kw.get("accumulate_grad_batches", 1)),
                                                   batch_size=None))
    return trainer


@pytest.mark.parametrize("m", [0.0, 1.0])
def test_trainer_updates_momentum_after_each_optimizer_step(m):
    model = tiny_model(momentum=m, queue_size=32, warmup_steps=1)
    init = [p.clone() for p in model.momentum_tower.parameters()]
    _fit(model, 2, accumulate_grad_batches=2)
    assert len(model.queue) == 32  # 4 micro-batches of 8 enqueued
    for pk, p, p0 in zip(model.momentum_tower.parameters(), model.doc_tower.parameters(), init):
        torch.testing.assert_close(pk, p if m == 0.0 else p0)
    assert any(not torch.allclose(p, p0) for p, p0 in zip(model.doc_tower.parameters(), init))


def test_queue_and_momentum_saved_in_checkpoint(tmp_path):
    model = tiny_model(momentum=0.5, queue_size=20, cache_chunk_size=3, warmup_steps=1)
    trainer = _fit(model, 2, tmp_path)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    fresh = tiny_model(momentum=0.5, queue_size=20, cache_chunk_size=3, seed=5)
    fresh.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    assert len(fresh.queue) == 16
    for a, b in zip(fresh.queue.contents(), model.queue.contents()):
        torch.testing.assert_close(a, b)
    for a, b in zip(fresh.momentum_tower.parameters(), model.momentum_tower.parameters()):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------- DDP
WORLD, N, STEPS = 2, 8, 3



def _batches() -> list[dict]:
    out = []
    for s in range(STEPS):
        b = tiny_batch(N, seed=30 + s, groups=[g + 10 * s for g in GROUPS])
        b["pair_id"] = b["pair_id"] + 10 * s
        out.append(b)
    return out


def _run(model, step_fn) -> list[dict]:
    """SGD steps over the batches; after each: loss, grads, queue contents."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    records = []
    for batch in _batches():
        opt.zero_grad()
        loss = step_fn(batch)
        loss.backward()
        records.append({"loss": loss.detach().clone(),
                        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        "queue": model.queue.contents()})
        opt.step()
        model.update_momentum_encoder()
    return records


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for momentum in (None, 0.9):
            model = tiny_model(symmetric=True, queue_size=12, momentum=momentum)
            ddp = DDP(_Wrap(model), broadcast_buffers=False)  # no buffer broadcast: queues must agree on their own

            def step(batch):
                local = {k: v[rank * N // WORLD:(rank + 1) * N // WORLD] for k, v in batch.items()}
                loss = ddp(local)
                total = loss.detach().clone()
                dist.all_reduce(total)
                return loss - loss.detach() + total / WORLD  # report the global mean, keep the local graph

            torch.save(_run(model, step), os.path.join(out_dir, f"rank{rank}_{momentum}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_queue")
    mp.spawn(_ddp_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_ddp_queue_identical_and_loss_equals_full_batch(ddp_results, momentum):
    model = tiny_model(symmetric=True, queue_size=12, momentum=momentum)
    ref = _run(model, lambda b: model.contrastive_step(b)[0])
    ranks = [torch.load(ddp_results / f"rank{r}_{momentum}.pt", weights_only=False) for r in range(WORLD)]
    for step in range(STEPS):
        r0, r1, single = ranks[0][step], ranks[1][step], ref[step]
        for a, b, c in zip(r0["queue"], r1["queue"], single["queue"]):
            assert torch.equal(a, b), "ranks hold different queues"
            torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)
        assert len(single["queue"][1]) == min(12, N * (step + 1))
        for r in (r0, r1):
            torch.testing.assert_close(r["loss"], single["loss"], rtol=1e-9, atol=1e-11)
            for name, g in single["grads"].items():
                torch.testing.assert_close(r["grads"][name], g, rtol=1e-7, atol=1e-10, msg=name)
