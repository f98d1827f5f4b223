"""The library on CUDA computes what it computes on CPU.

Each test runs on ``cpu`` and, when torch sees a GPU, on ``cuda`` (marked ``gpu``; skipped without one),
against a slow reference computed on the CPU in float64:

- the exact index: bit-identical ids and scores, ties included, on integer-valued vectors (their dot
  products are exact in float32 whatever the summation order, so CPU, CUDA and the float64 reference
  must agree to the bit); on float data, a correct top-k up to float32 rounding, also when the process
  allows TF32 (``torch.set_float32_matmul_precision("high")``, which Lightning recommends on GPUs);
- ranks, mining controls and the false-negative filter chain: identical results on both devices;
- the dual encoder: loss and every gradient equal to the CPU ones (float64), for each loss; GradCache
  with dropout replays the CUDA RNG state exactly.

The end-to-end runs of every config (``test_configs_run.py``) use ``accelerator: auto``, so on a GPU
machine they train and mine on CUDA too; :func:`test_fit_on_gpu_mines_on_cuda` checks that it does.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrastive.filters import FilterChain, FilterContext
from contrastive.index import ExactIndex, IndexInputError, exact_topk, rank_pair
from contrastive.registry import FILTERS, LOSSES
from contrastive.samplers.mining import select_negatives
from tests.helpers import tiny_batch, tiny_model

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]


def to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: a stable descending sort of each full row (ties: lower id first)."""
    v, i = torch.sort(scores, dim=1, descending=True, stable=True)
    return v[:, :k], i[:, :k]


def integer_vectors(n: int, d: int, seed: int) -> torch.Tensor:
    """Entries in {-2..2}: many exactly tied scores, all exact in float32."""
    return torch.randint(-2, 3, (n, d), generator=torch.Generator().manual_seed(seed)).float()


# ---------------------------------------------------------------------------------------------- exact index
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 37, 3001])
@pytest.mark.parametrize("blocks", [None, (257, 100), (1024, 512)], ids=["default", "ragged", "square"])
def test_exact_topk_integer_scores_bit_identical(device, k, blocks):
    x, q = integer_vectors(3001, 16, 0), integer_vectors(517, 16, 1)
    ref_v, ref_i = stable_topk(q.double() @ x.double().T, k)
    chunk, qchunk = blocks or (None, None)
    v, i = exact_topk(q.to(device), x.to(device), k, chunk_size=chunk, query_chunk_size=qchunk)
    assert v.device.type == device and i.device.type == device
    assert torch.equal(i.cpu(), ref_i), "ids differ from the stable sort (tie order or selection)"
    assert torch.equal(v.cpu().double(), ref_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("global_precision", ["highest", "high"])
def test_exact_topk_float_is_exact_whatever_the_global_matmul_precision(device, global_precision):
    """Random float vectors: the returned set is a true top-k (its float64 scores equal the float64
    top-k scores up to float32 rounding), and the process-wide precision setting is left as it was."""
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(6000, 256, generator=g), torch.randn(300, 256, generator=g)
    ref_v, _ = stable_topk(q.double() @ x.double().T, 50)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(global_precision)
    try:
        v, i = exact_topk(q.to(device), x.to(device), 50)
        assert torch.get_float32_matmul_precision() == global_precision
    finally:
        torch.set_float32_matmul_precision(before)
    got64 = (q.double().unsqueeze(1) * x.double()[i.cpu()]).sum(-1)  # float64 scores of the returned ids
    torch.testing.assert_close(got64, ref_v, rtol=0, atol=1e-4)  # float32 error on |s| ~ 16: ~1e-5
    torch.testing.assert_close(v.cpu().double(), got64, rtol=0, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_precision_high_allows_tf32_on_cuda_and_highest_does_not():
    """The precision knob is not a no-op: on a GPU with TF32 (compute capability >= 8.0), ``"high"``
    scores carry TF32 rounding (~1e-3 relative), ``"highest"`` float32 rounding (~1e-6)."""
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no TF32 before compute capability 8.0")
    g = torch.Generator().manual_seed(4)
    x, q = torch.randn(4096, 256, generator=g), torch.randn(256, 256, generator=g)
    errs = {}
    for p in ("highest", "high"):
        v, i = exact_topk(q.cuda(), x.cuda(), 10, precision=p)
        got64 = (q.double().unsqueeze(1) * x.double()[i.cpu()]).sum(-1)
        errs[p] = float((v.cpu().double() - got64).abs().max())
    assert errs["highest"] < 1e-4, errs
    assert errs["high"] > 10 * errs["highest"], errs


def test_exact_index_device_resolution_and_errors():
    assert ExactIndex(8).device.type == ("cuda" if CUDA else "cpu")  # "auto", like FAISS' use_gpu="auto"
    assert ExactIndex(8, device=None).device.type == "cpu"
    assert ExactIndex(8, device="cpu").device.type == "cpu"
    with pytest.raises(IndexInputError, match="device must be"):
        ExactIndex(8, device="gpu0")
    with pytest.raises(IndexInputError, match="precision must be one of"):
        ExactIndex(8, precision="tf32")
    with pytest.raises(IndexInputError, match="precision must be one of"):
        exact_topk(torch.randn(3, 4), torch.randn(5, 4), 2, precision="low")
    if not CUDA:
        with pytest.raises(IndexInputError, match="torch sees no CUDA device"):
            ExactIndex(8, device="cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_exact_index_search_save_load_across_devices(device, tmp_path):
    x, q = integer_vectors(2000, 12, 5), integer_vectors(100, 12, 6)
    index = ExactIndex(12, "ip", device=device, chunk_size=300)
    index.add(x[:1100])
    index.add(x[1100:])  # two adds: ids continue
    v, i = index.search(q, 20)
    assert i.device.type == "cpu"  # results always come back on CPU
    ref_v, ref_i = stable_topk(q.double() @ x.double().T, 20)
    assert torch.equal(i, ref_i) and torch.equal(v.double(), ref_v)
    index.save(tmp_path / "idx.pt")
    for where in ("cpu", device):
        loaded = ExactIndex.load(tmp_path / "idx.pt", expected_dim=12, device=where)
        assert loaded.device.type == where and loaded.precision == "highest"
        assert torch.equal(loaded.search(q, 20)[1], ref_i)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_pair_on_device_equals_cpu_reference(device):
    x, q = integer_vectors(1500, 10, 7), integer_vectors(400, 10, 8)
    target = torch.randint(0, 1500, (400,), generator=torch.Generator().manual_seed(9))
    groups = torch.arange(1500) % 700  # every row has a duplicate group of 2-3 rows
    for ties in ("pessimistic", "optimistic"):
        raw, filt = rank_pair(q.to(device), x.to(device), target.to(device), groups.to(device), chunk_size=256,
                              ties=ties, tie_rtol=0)
        s = q.double() @ x.double().T
        gold = s[torch.arange(400), target].unsqueeze(1)
        above = s >= gold if ties == "pessimistic" else s > gold
        above[torch.arange(400), target] = False
        same = groups.unsqueeze(0) == groups[target].unsqueeze(1)
        assert torch.equal(raw.cpu(), 1 + above.sum(1))
        assert torch.equal(filt.cpu(), 1 + (above & ~same).sum(1))


# ---------------------------------------------------------------------------------------------- mining, filters
def _candidates(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    q, k = 64, 40
    scores = torch.rand(q, k, generator=g)
    scores[:, -3:] = float("nan")  # padding
    ids = torch.stack([torch.randperm(500, generator=g)[:k] for _ in range(q)])
    ids[:, -3:] = -1
    positives = [[int(ids[r, r % 5])] + ([int(ids[r, 7])] if r % 3 == 0 else []) for r in range(q)]
    return scores, ids, positives


@pytest.mark.parametrize("device", DEVICES)
def test_select_negatives_on_device_equals_cpu(device):
    scores, ids, positives = _candidates(10)
    pos_scores = [[float(scores[r, r % 5])] + ([float(scores[r, 7])] if r % 3 == 0 else []) for r in range(64)]
    kw = dict(num_negatives=6, range_min=2, range_max=25, sampling="top", relative_margin=0.05, max_score=0.97,
              chunk_size=16)
    cpu = select_negatives(scores, ids, positives, pos_scores, **kw)
    dev = select_negatives(scores.to(device), ids.to(device), positives, pos_scores, **kw)
    assert dev.ids.device.type == device
    assert torch.equal(dev.ids.cpu(), cpu.ids) and torch.equal(dev.counts.cpu(), cpu.counts)
    torch.testing.assert_close(dev.scores.cpu(), cpu.scores, rtol=0, atol=0)
    assert dev.stats == cpu.stats
    assert cpu.stats["removed_positives"] > 0 and cpu.stats["removed_window"] > 0  # the case exercises both
    # random sampling draws from the device's generator: another stream, but the same window and rules
    rnd = select_negatives(scores.to(device), ids.to(device), positives, pos_scores,
                           **{**kw, "sampling": "random"}, generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(rnd.counts.cpu(), cpu.counts)
    for r in range(64):
        assert set(rnd.ids[r].tolist()) - {-1} <= set(select_negatives(
            scores[r:r + 1], ids[r:r + 1], positives[r:r + 1], pos_scores[r:r + 1],
            **{**kw, "num_negatives": 40}).ids[0].tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_filter_chain_on_device_equals_cpu(device):
    scores, ids, positives = _candidates(11)
    scores[::4, 20], scores[::5, 21] = 5.0, -4.0  # outliers for the IQR filter
    g = torch.Generator().manual_seed(12)
    corpus = torch.randn(500, 16, generator=g)
    anchors = torch.randn(64, 16, generator=g)
    pos_ids = torch.tensor([p + [-1] * (2 - len(p)) for p in positives])
    pos_scores = torch.where(pos_ids >= 0, torch.rand(64, 2, generator=g), torch.full((64, 2), float("nan")))

    def run(dev: str):
        ctx = FilterContext(scores=scores.to(dev), candidate_ids=ids.to(dev), positive_ids=pos_ids.to(dev),
                            positive_scores=pos_scores.to(dev), dup_group=(torch.arange(500) // 3).to(dev),
                            labels=(torch.arange(500) % 7).to(dev), anchor_labels=(torch.arange(64) % 7).to(dev),
                            corpus_embeddings=corpus.to(dev), anchor_embeddings=anchors.to(dev))
        chain = FilterChain([FILTERS.build("known_duplicates"), FILTERS.build("positive_aware", mode="perc", perc=0.95),
                             FILTERS.build("iqr_outliers"), FILTERS.build("neighbour_consensus", k=5, anchors="all"),
                             FILTERS.build("same_label")])
        return chain.apply(ctx)

    cpu, dev = run("cpu"), run(device)
    assert dev.keep.device.type == device
    assert torch.equal(dev.keep.cpu(), cpu.keep)
    assert torch.equal(dev.false_negative_mask.cpu(), cpu.false_negative_mask)
    assert dev.removed == cpu.removed and all(v > 0 for v in cpu.removed.values()), cpu.removed


# ---------------------------------------------------------------------------------------------- model
LOSS_KW = {"infonce": {"temperature": 0.1, "symmetric": True}, "dcl": {"temperature": 0.1, "tau_plus": 0.1},
           "hcl": {"temperature": 0.1, "tau_plus": 0.1, "beta": 1.0}, "slipform": {"temperature": 0.1, "calibration": "constant"}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", sorted(LOSS_KW))
def test_dual_encoder_loss_and_gradients_on_device_equal_cpu(device, loss):
    batch = tiny_batch(12, groups=[0, 1, 2, 3, 0, 5, 6, 3, 8, 9, 10, 11])
    out = {}
    for dev in ("cpu", device):
        model = tiny_model()  # float64, seeded: the same weights each time
        model.loss_fn = LOSSES.build(loss, **LOSS_KW[loss]).double()
        model = model.to(dev)
        value, _ = model.contrastive_step(to(batch, dev))
        value.backward()
        out[dev] = (value.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None})
    (lc, gc), (ld, gd) = out["cpu"], out[device]
    torch.testing.assert_close(ld, lc, rtol=1e-10, atol=1e-12)
    assert gc.keys() == gd.keys() and len(gc) > 4
    for n in gc:
        torch.testing.assert_close(gd[n], gc[n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.gpu
@needs_cuda
def test_gradcache_dropout_replays_the_cuda_rng():
    """GradCache with dropout on CUDA: the replayed chunks draw the same CUDA dropout masks as the first,
    no-grad pass, so cached gradients equal those of the chunk-wise forward with a graph."""
    from tests.test_gradcache import (GROUPS, N, assert_same, cached_grads, chunkwise, dropout_model, plain_grads,
                                      with_negs)

    batch = to(with_negs(tiny_batch(N, groups=GROUPS)), "cuda")
    ref_model = dropout_model(True).cuda()
    chunkwise(ref_model, 4)
    ref = plain_grads(ref_model, batch)
    cached = cached_grads(dropout_model(True, cache_chunk_size=4).cuda(), batch)
    assert_same(cached, ref, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(plain_grads(dropout_model(True).cuda(), batch)[0], ref[0])  # dropout is active


@pytest.mark.gpu
@needs_cuda
@pytest.mark.slow
def test_fit_on_gpu_mines_on_cuda(tmp_path, monkeypatch):
    """The CLI on a GPU: the model trains on CUDA and the faiss_hard refresh mines with a CUDA exact index."""
    from pathlib import Path

    import contrastive.index.exact as exact
    from contrastive.cli import main
    from tests.test_cli_e2e import tiny_overrides

    devices: list[str] = []
    real = exact.exact_topk

    def spy(queries, *args, **kwargs):
        devices.append(queries.device.type)
        return real(queries, *args, **kwargs)

    monkeypatch.setattr(exact, "exact_topk", spy)
    cfg = Path(__file__).resolve().parents[1] / "configs/codesearch/infonce.yaml"
    assert main(["fit", str(cfg), *tiny_overrides(tmp_path), "sampler=faiss_hard", "trainer.accelerator=gpu",
                 "trainer.max_epochs=2", "trainer.limit_train_batches=3", "eval.bm25_baseline=false"]) == 0
    res = json.loads(next((tmp_path / "runs").glob("*/version_*/results.json")).read_text())
    assert res["device"]["type"] == "cuda" and res["device"]["name"]
    assert 0.0 <= res["test"]["mrr"] <= 1.0
    assert devices and set(devices) == {"cuda"}, devices


# ------------------------------------------------------------------------------ vision-language and detection
def _cuda_fit(config, overrides: list[str], runs) -> dict:
    from contrastive.cli import main

    assert main(["fit", str(config), *overrides, "trainer.accelerator=gpu"]) == 0
    res = json.loads(sorted(runs.glob("*/version_*/results.json"))[-1].read_text())
    assert res["device"]["type"] == "cuda", res["device"]
    return res


def _detection_cases() -> list:
    from contrastive.detection.category_samplers import CATEGORY_SAMPLERS
    from tests.test_detection_configs import CONFIGS

    cq = next(c for c in CONFIGS if c.stem == "category_query")
    cases = [pytest.param(c, [], id=c.stem) for c in CONFIGS]
    cases += [pytest.param(cq, [f"category_sampler.name={s}"], id=f"{cq.stem}-{s}") for s in sorted(CATEGORY_SAMPLERS)]
    cases += [pytest.param(cq, ["category_sampler.name=cq_topk", "category_sampler.force_include_gt=true"],
                           id=f"{cq.stem}-cq_topk-gt"),
              pytest.param(CONFIGS[0], ["model.denoising.groups=2"], id=f"{CONFIGS[0].stem}-denoising")]
    return cases


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config, extra", _detection_cases())
def test_detection_fit_on_gpu(config, extra, tmp_path):
    """Each detection config, each category sampler (and the ground-truth-kept learned selection) and the
    denoising queries train, validate and test on CUDA (matcher indices, filters and samplers on the device)."""
    from tests.test_detection_configs import _overrides

    res = _cuda_fit(config, [*_overrides(tmp_path, tmp_path / "cache"), *extra], tmp_path / "runs")
    assert 0.0 <= res["test"]["mAP"] <= 1.0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs" / "clip").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_clip_fit_on_gpu(config, tmp_path):
    """Each vision-language config trains (mining from the second epoch where it mines) and tests on CUDA."""
    from tests.test_configs_run import FAST, clip_overrides

    res = _cuda_fit(config, [*clip_overrides(tmp_path), *FAST, "trainer.max_epochs=2"], tmp_path / "runs")
    assert 0.0 <= res["test"]["t2i/R@1"] <= 1.0
