"""GradCache (Gao et al. 2021, arXiv 2101.06983): cached gradients equal the full-batch ones, the chunked
loss equals the full loss, and the surrogate works under Lightning's automatic optimisation."""
from __future__ import annotations

import inspect
import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from contrastive.encoders import TransformerTextEncoder
from contrastive.losses import ContrastiveInputs, InfoNCELoss
from datamodules.codesearch.model import DualEncoderModule
from contrastive.models.gradcache import chunk_slices, chunked_inputs_loss_grads, encode_without_grad, replay_backward
from contrastive.registry import LOSSES
from tests.helpers import tiny_batch, tiny_model

N = 10
GROUPS = [0, 1, 2, 3, 0, 5, 6, 3, 8, 9]


def with_negs(batch: dict, k: int = 5, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = dict(batch)
    batch["neg_ids"] = torch.randint(1, 50, (k, batch["doc_ids"].shape[1]), generator=g)
    batch["neg_mask"] = torch.ones_like(batch["neg_ids"], dtype=torch.bool)
    batch["neg_pair_id"] = torch.arange(k) + 1000
    batch["neg_dup_group"] = torch.tensor([1000, 1001, 3, 1003, 1004][:k])  # one known duplicate of group 3
    return batch


def dropout_model(symmetric: bool = False, dtype=torch.float64, **kw) -> DualEncoderModule:
    torch.manual_seed(0)
    enc = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.2)
    return DualEncoderModule(enc, InfoNCELoss(temperature=0.1, symmetric=symmetric), projection_dim=8, **kw).to(dtype)


def chunkwise(model: DualEncoderModule, chunk: int) -> None:
    """Make the model's uncached step encode every side in chunks of ``chunk`` rows (as GradCache does)."""
    for name in ("encode", "encode_keys"):
        orig = getattr(model, name)
        setattr(model, name, lambda inputs, *side, f=orig: torch.cat(
            [f({k: v[s] for k, v in inputs.items()}, *side)
             for s in chunk_slices(next(iter(inputs.values())).shape[0], chunk)]))


def plain_grads(model: DualEncoderModule, batch: dict, seed: int = 123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = model.contrastive_step(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def cached_grads(model: DualEncoderModule, batch: dict, seed: int = 123):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    surrogate, loss, _ = model.gradcache_step(batch)
    assert all(p.grad is None for p in model.parameters()), "gradcache_step must not write .grad"
    surrogate.backward()
    torch.testing.assert_close(surrogate.detach(), loss)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------- model level
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("negs", [False, True])
@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_cached_equals_plain_float64(symmetric, negs, chunk):
    batch = tiny_batch(N, groups=GROUPS)
    batch = with_negs(batch) if negs else batch
    plain = plain_grads(tiny_model(symmetric=symmetric), batch)
    cached = cached_grads(tiny_model(symmetric=symmetric, cache_chunk_size=chunk), batch)
    assert_same(cached, plain, rtol=1e-5, atol=1e-10)
    assert_same(cached, plain, rtol=1e-9, atol=1e-11)  # in float64 it is in fact equal to rounding


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_cached_learnable_temperature_and_unchunked_loss(chunked_loss):
    def make(**kw):
        torch.manual_seed(0)
        enc = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
        loss = InfoNCELoss(temperature=0.1, learnable_temperature=True, symmetric=True)
        return DualEncoderModule(enc, loss, projection_dim=8, **kw).double()

    batch = with_negs(tiny_batch(N, groups=GROUPS))
    plain = plain_grads(make(), batch)
    cached = cached_grads(make(cache_chunk_size=4, cache_chunked_loss=chunked_loss), batch)
    assert "loss_fn.temperature.log_scale" in cached[1]
    assert_same(cached, plain, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("symmetric", [False, True])
def test_cached_equals_plain_float32(symmetric):
    batch = with_negs(tiny_batch(N, groups=GROUPS))
    plain = plain_grads(tiny_model(symmetric=symmetric, dtype=torch.float32), batch)
    cached = cached_grads(tiny_model(symmetric=symmetric, dtype=torch.float32, cache_chunk_size=3), batch)
    assert_same(cached, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_dropout_one_chunk_equals_plain(symmetric):
    """With dropout > 0 and one chunk, the replayed masks are those of the plain step (same seed)."""
    batch = with_negs(tiny_batch(N, groups=GROUPS))
    plain = plain_grads(dropout_model(symmetric), batch)
    cached = cached_grads(dropout_model(symmetric, cache_chunk_size=N), batch)
    assert_same(cached, plain, rtol=1e-9, atol=1e-11)
    other = plain_grads(dropout_model(symmetric), batch, seed=999)
    assert not torch.allclose(other[0], plain[0]), "dropout has no effect: the test cannot fail"


@pytest.mark.parametrize("symmetric", [False, True])
def test_dropout_replay_equals_chunkwise_full_batch(symmetric):
    """With chunks, dropout masks are drawn per chunk; the reference is the full-batch loss of the same
    chunk-wise forward *with* a graph: equal only if each chunk's RNG state is replayed exactly."""
    chunk = 4
    batch = with_negs(tiny_batch(N, groups=GROUPS))
    ref_model = dropout_model(symmetric)
    chunkwise(ref_model, chunk)
    ref = plain_grads(ref_model, batch)
    cached = cached_grads(dropout_model(symmetric, cache_chunk_size=chunk), batch)
    assert_same(cached, ref, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(plain_grads(dropout_model(symmetric), batch)[0], ref[0])


def test_replay_leaves_rng_state_as_after_first_pass():
    model = dropout_model(cache_chunk_size=3)
    batch = tiny_batch(N)
    torch.manual_seed(5)
    chunks = encode_without_grad(model.encode_queries, (batch["query_ids"], batch["query_mask"]), 3)
    state = torch.get_rng_state()
    replay_backward([(chunks, torch.ones_like(chunks.embeddings))], list(model.parameters()))
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="cache_chunk_size"):
        tiny_model(cache_chunk_size=0)


# ---------------------------------------------------------------------------------------------- chunked loss
def _buildable_losses() -> list[str]:
    names = []
    for n in LOSSES.names():
        try:
            LOSSES.build(n)
        except TypeError:  # needs constructor arguments (e.g. weighted_sum's components)
            continue
        names.append(n)
    return names


@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_loss_gradient_equals_full(symmetric):
    """For every registered loss (built with defaults; ``symmetric=True`` where it has that option), the
    row-chunked loss and its gradients equal the full loss's. The registry is read inside the test so that
    a broken sibling module fails this test rather than the collection of the file."""
    names = _buildable_losses()
    assert "infonce" in names
    for name in names:
        if symmetric and "symmetric" not in inspect.signature(LOSSES.get(name)).parameters:
            continue
        _check_chunked_loss(LOSSES.build(name, **({"symmetric": True} if symmetric else {})).double(), name, symmetric)


def _check_chunked_loss(loss_fn, name: str, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(0)
    b, m, d = 11, 11 if symmetric else 16, 8
    a = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)
    pos = torch.zeros(b, m, dtype=torch.bool)
    pos[torch.arange(b), torch.arange(b)] = True
    pos[0, 3] = pos[3, 0] = True  # two positives
    fn = torch.zeros(b, m, dtype=torch.bool)
    fn[1, 5] = fn[5, 1] = True
    a, c = a.requires_grad_(), c.requires_grad_()  # grads are returned for inputs that require grad
    inputs = ContrastiveInputs(a, c, pos, false_negative_mask=fn,
                               difficulty=torch.rand(b, m, generator=g, dtype=torch.float64),
                               similarity_estimate=torch.rand(b, m, generator=g, dtype=torch.float64))
    lp = [p for p in loss_fn.parameters() if p.requires_grad]
    a_, c_ = a.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    full = loss_fn.forward_inputs(
        ContrastiveInputs(a_, c_, pos, None, fn, inputs.difficulty, inputs.similarity_estimate))
    full.loss.backward()
    res = chunked_inputs_loss_grads(loss_fn, inputs, chunk_size=3, params=lp)
    assert res.num_chunks == 4, name
    torch.testing.assert_close(res.loss, full.loss.detach(), rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(res.grads[0], a_.grad, rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(res.grads[1], c_.grad, rtol=1e-9, atol=1e-12, msg=name)
    for p, gp in zip(lp, res.param_grads):
        torch.testing.assert_close(gp, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    if "acc" in full.logs:
        torch.testing.assert_close(res.logs["acc"], full.logs["acc"].float(), rtol=1e-6, atol=1e-6, msg=name)


def test_chunked_loss_falls_back_when_an_anchor_has_no_negative():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    fn = torch.zeros(6, 6, dtype=torch.bool)
    fn[2] = True
    fn[2, 2] = False  # anchor 2: only its positive is left, so the loss skips it
    loss_fn = InfoNCELoss(temperature=0.5)
    a_, c_ = a.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    full = loss_fn(a_, c_, None, false_negative_mask=fn)
    full.loss.backward()
    res = chunked_inputs_loss_grads(loss_fn, ContrastiveInputs(a, c, None, false_negative_mask=fn), chunk_size=2)
    assert res.num_chunks == 1
    torch.testing.assert_close(res.loss, full.loss.detach())
    torch.testing.assert_close(res.grads[0], a_.grad)


# ---------------------------------------------------------------------------------------------- Lightning
class _Data(torch.utils.data.Dataset):
    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]


def _loader(n_batches: int, negs: bool = False):
    batches = [tiny_batch(8, seed=10 + i, groups=[0, 1, 2, 3, 0, 5, 6, 3]) for i in range(n_batches)]
    for i, b in enumerate(batches):
        b["pair_id"] = b["pair_id"] + 100 * i
        b["dup_group"] = b["dup_group"] + 100 * i
    if negs:
        batches = [with_negs(b, seed=i) for i, b in enumerate(batches)]
    return torch.utils.data.DataLoader(_Data(batches), batch_size=None, shuffle=False)


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     precision="64-true", **kw)


class _SGD(DualEncoderModule):
    """SGD makes the comparison sensitive to the gradient's scale (AdamW would hide a wrong factor)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


class _OrderProbe(L.LightningModule):
    def __init__(self, naive_backward: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.events: list[str] = []
        self.naive_backward = naive_backward
        self.grads_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.events.append("training_step")
        if self.naive_backward:  # the tempting-but-wrong GradCache: backward of a chunk inside training_step
            torch.autograd.backward((self.w * 100.0).sum())
        return (self.w * batch).sum()

    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.events.append("zero_grad")
        optimizer.zero_grad()

    def on_after_backward(self):
        self.events.append("backward")
        self.grads_seen.append(self.w.grad.clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_zero_grad_runs_after_training_step():
    """Verifies the Lightning source (loops/optimization/automatic.py, Closure.closure): training_step,
    then zero_grad, then backward, so gradients written into .grad inside training_step are lost."""
    probe = _OrderProbe(naive_backward=True)
    data = torch.utils.data.DataLoader([torch.ones(3)] * 2, batch_size=None)
    L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(probe, data)
    assert probe.events[:3] == ["training_step", "zero_grad", "backward"]
    torch.testing.assert_close(probe.grads_seen[0], torch.ones(3))  # the naive 100s were wiped


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_cached_matches_plain_sgd(accumulate):
    steps = 3
    results = {}
    for chunk in (None, 3):
        torch.manual_seed(0)
        enc = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
        sgd = _SGD(enc, InfoNCELoss(temperature=0.1, symmetric=True), projection_dim=8, cache_chunk_size=chunk).double()
        init = {n: p.detach().clone() for n, p in sgd.named_parameters()}
        _trainer(max_steps=steps, accumulate_grad_batches=accumulate).fit(sgd, _loader(steps * accumulate, negs=True))
        results[chunk] = {n: p.detach().clone() for n, p in sgd.named_parameters()}
    for name, p in results[None].items():
        assert not torch.allclose(p, init[name]) or "log_scale" in name, f"{name} did not train"
        torch.testing.assert_close(results[3][name], p, rtol=1e-8, atol=1e-10, msg=name)


def test_trainer_cached_matches_plain_default_adamw():
    results = {}
    for chunk in (None, 4):
        model = tiny_model(cache_chunk_size=chunk, warmup_steps=1)
        _trainer(max_steps=2).fit(model, _loader(2))
        results[chunk] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, p in results[None].items():
        torch.testing.assert_close(results[4][name], p, rtol=1e-7, atol=1e-9, msg=name)


# ---------------------------------------------------------------------------------------------- DDP
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Surrogate(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.gradcache_step(batch)[0]


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = tiny_model(symmetric=True, cache_chunk_size=3)
        ddp = DDP(_Surrogate(model))
        full = tiny_batch(8, groups=[0, 1, 2, 3, 0, 5, 6, 3])
        local = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}
        surrogate = ddp(local)
        surrogate.backward()  # DDP's one all-reduce of the (surrogate) gradients
        total = surrogate.detach().clone()
        dist.all_reduce(total)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": total / WORLD, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_cached_equals_single_process_full_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    loss, grads = plain_grads(tiny_model(symmetric=True), tiny_batch(8, groups=[0, 1, 2, 3, 0, 5, 6, 3]))
    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(res["loss"], loss, rtol=1e-10, atol=1e-12)
        for name, g in grads.items():
            torch.testing.assert_close(res["grads"][name], g, rtol=1e-8, atol=1e-10, msg=name)
