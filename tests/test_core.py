"""The core is modality-agnostic and the library stands alone (issue 12).

- A non-text setting: random vectors with a group structure, several positives per anchor, and a sampler
  that returns generated negatives (perturbed copies of the positive, rendered by the datamodule) besides
  refreshed hard corpus negatives, trained through :class:`ContrastiveModule`, ``attach_sampler``, the
  false-negative filters and the refresh callback.
- The candidate assembler runs the filter chain once per step, also with GradCache's chunked loss.
- The registry rejects a registration that is not of its family.
- ``contrastive.losses/samplers/filters/index/metrics`` import neither Lightning, ``datamodules`` nor the CLI.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from contrastive.callbacks import NegativeRefreshCallback
from contrastive.filters import FilterChain, KnownDuplicatesFilter, PositiveAwareFilter
from contrastive.losses import InfoNCELoss
from contrastive.models import ContrastiveBatch, ContrastiveModule, ExtraNegatives, OptimizerSettings, ProjectedTower
from contrastive.registry import SAMPLERS, Registry
from contrastive.samplers import FaissHardNegativeSampler
from contrastive.samplers.base import GeneratedNegatives, SampledNegatives
from contrastive.samplers.collate import attach_sampler

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, D_IN = 16, 8, 16


# ------------------------------------------------------------------------------------------ vectors setting
class VectorEncoder(nn.Module):
    """A vector tower: ``{"x": (N, d_in)}`` → ``(N, hidden)``."""

    def __init__(self, d_in: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.output_dim = hidden

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.net(inputs["x"])


class VectorData(L.LightningDataModule):
    """``CLASSES x PER_CLASS`` training rows; row ``r`` = (anchor vector, candidate vector) of class
    ``r // PER_CLASS`` (its label); classes ``2k`` and ``2k + 1`` form one duplicate group. Anchors and
    candidates live in different, randomly rotated spaces, so the towers have to learn the match."""

    def __init__(self, sampler, batch_size: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        n = CLASSES * PER_CLASS
        centre = torch.randn(CLASSES, D_IN, generator=g)
        self.labels = torch.arange(n) // PER_CLASS
        self.groups = self.labels // 2
        self.ids = torch.arange(n) + 10_000
        rot = torch.linalg.qr(torch.randn(D_IN, D_IN, generator=g))[0]
        self.anchor_x = centre[self.labels] + 0.3 * torch.randn(n, D_IN, generator=g)
        self.candidate_x = (centre[self.labels] + 0.3 * torch.randn(n, D_IN, generator=g)) @ rot
        self.sampler, self.batch_size, self.seed = sampler, batch_size, seed

    def collate(self, rows: list[int]) -> dict:
        idx = torch.as_tensor(rows)
        return {"anchor_x": self.anchor_x[idx], "candidate_x": self.candidate_x[idx], "pair_id": self.ids[idx],
                "label": self.labels[idx], "group": self.groups[idx]}

    def candidate_rows(self, rows: list[int]) -> dict:
        return {"x": self.candidate_x[torch.as_tensor(rows, dtype=torch.long)]}

    def render(self, items: list) -> dict:
        """Generated negatives: ``(row, seed)`` → the row's candidate pushed off its class (a "re-render")."""
        out = []
        for row, seed in items:
            g = torch.Generator().manual_seed(int(seed))
            out.append(self.candidate_x[row] + 1.5 * torch.randn(D_IN, generator=g))
        return {"x": torch.stack(out)}

    def row_inputs(self, rows, side):
        x = self.anchor_x if side == "anchor" else self.candidate_x
        return {"x": x[torch.as_tensor(list(rows), dtype=torch.long)]}

    def setup(self, stage=None):
        self.loader = attach_sampler(self.sampler, list(range(len(self.ids))), ids=self.ids, groups=self.groups,
                                     base_collate=self.collate, candidate_inputs=self.candidate_rows,
                                     generated_inputs=self.render, batch_size=self.batch_size, seed=self.seed,
                                     setup=not self.sampler.is_setup)

    def train_dataloader(self):
        return self.loader


def vector_batch(batch: dict) -> ContrastiveBatch:
    """The vector setting's batch adapter: labels (classes) give several positives per anchor."""
    negatives = None
    if "neg_x" in batch:
        negatives = ExtraNegatives(inputs={"x": batch["neg_x"]}, ids=batch["neg_pair_id"],
                                   labels=torch.where(batch["neg_row"] >= 0, batch["neg_row"] // PER_CLASS, -1),
                                   groups=torch.where(batch["neg_row"] >= 0, batch["neg_row"] // PER_CLASS // 2, -1),
                                   owner=batch.get("neg_owner"))
    return ContrastiveBatch(anchors={"x": batch["anchor_x"]}, candidates={"x": batch["candidate_x"]},
                            anchor_ids=batch["pair_id"], candidate_ids=batch["pair_id"],
                            anchor_labels=batch["label"], candidate_labels=batch["label"],
                            anchor_groups=batch["group"], candidate_groups=batch["group"], negatives=negatives)


class PerturbingSampler(FaissHardNegativeSampler):
    """Refreshed hard corpus negatives plus one generated negative per anchor: its own positive,
    re-rendered off its class, visible only to that anchor."""

    def sample(self, rows):
        corpus = super().sample(rows)
        items = [(int(r), 1000 * self.epoch + int(r)) for r in rows]
        return SampledNegatives(rows=corpus, generated=GeneratedNegatives(items=items, owner=torch.arange(len(rows))))


def top1_same_label(model: ContrastiveModule, dm: VectorData) -> float:
    with torch.no_grad():
        a = model.encode({"x": dm.anchor_x}, "anchor")
        c = model.encode({"x": dm.candidate_x}, "candidate")
    s = a @ c.T
    s.fill_diagonal_(float("-inf"))  # another member of the class must come first
    return float((dm.labels[s.argmax(dim=1)] == dm.labels).float().mean())


def test_vector_setting_trains_with_multi_positives_generated_negatives_filters_and_refresh(tmp_path):
    torch.manual_seed(0)
    sampler = PerturbingSampler(num_negatives=2, range_max=20, filters=[KnownDuplicatesFilter()], warmup="random",
                                refresh_every_n_epochs=1, refresh_start_epoch=1)
    dm = VectorData(sampler)
    model = ContrastiveModule(ProjectedTower(VectorEncoder(D_IN), 16, True), InfoNCELoss(temperature=0.1),
                              candidate_tower=ProjectedTower(VectorEncoder(D_IN), 16, True),
                              optimizer=OptimizerSettings(lr=3e-3, warmup_steps=2, scheduler="constant"),
                              filters=[PositiveAwareFilter(mode="perc", perc=0.99)], batch_adapter=vector_batch)
    dm.setup("fit")
    before = top1_same_label(model, dm)
    seen: dict = {"owners": [], "positives": [], "logs": []}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["owners"].append(batch["neg_owner"].clone())
            b = vector_batch(batch)
            seen["positives"].append((b.a_labels[:, None] == b.c_labels[None, :]).sum(dim=1).float().mean())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen["logs"].append({k: float(v) for k, v in trainer.callback_metrics.items()})

    refresh = NegativeRefreshCallback(sampler, every_n_epochs=1, start_epoch=1, cache_dir=str(tmp_path / "neg"),
                                      progress_bar=False)
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[refresh, Spy()], deterministic=True)
    trainer.fit(model, datamodule=dm)
    assert [h["epoch"] for h in refresh.history] == [1, 2, 3]  # refreshed through encode(rows, side)
    assert sampler.table is not None and (sampler.table.neg_rows >= 0).all()
    assert all(int((o >= 0).sum()) == 32 for o in seen["owners"])  # one generated negative per anchor
    assert min(float(p) for p in seen["positives"]) > 1.0  # several positives per anchor (same class)
    assert any(log.get("train/filtered/positive_aware", 0) > 0 for log in seen["logs"])
    assert all(log["train/masked_duplicates"] >= 31 for log in seen["logs"])  # other anchors' generated items
    after = top1_same_label(model, dm)
    assert after > before + 0.3 and after > 0.8, (before, after)


# ------------------------------------------------------------------------------------------ filters once
def test_filter_chain_runs_once_per_step_also_with_chunked_gradcache():
    from datamodules.codesearch.model import DualEncoderModule
    from contrastive.encoders import TransformerTextEncoder
    from tests.helpers import tiny_batch

    calls = []

    class Counting(FilterChain):
        def apply(self, ctx):
            calls.append(ctx.scores.shape[0])
            return super().apply(ctx)

    torch.manual_seed(0)
    enc = TransformerTextEncoder(50, dim=16, num_layers=1, num_heads=2, ff_dim=32, max_length=16, dropout=0.0)
    model = DualEncoderModule(enc, InfoNCELoss(temperature=0.1), projection_dim=8, cache_chunk_size=3,
                              filters=[PositiveAwareFilter(mode="margin", margin=0.0)])
    model.filter_chain = model.assembler.filter_chain = Counting(model.filter_chain.filters)
    model.gradcache_step(tiny_batch(12))
    assert sum(calls) == 12  # every anchor row scored once (in row blocks), loss and logs share the masks
    calls.clear()
    model.contrastive_step(tiny_batch(12))
    assert calls == [12]


# ------------------------------------------------------------------------------------------ registries
def test_registering_a_non_sampler_as_a_sampler_fails_clearly():
    class Miner:
        def __call__(self, scores):
            return scores

    with pytest.raises(TypeError, match="must be a subclass of contrastive.samplers.base.NegativeSampler"):
        SAMPLERS.register("not_a_sampler")(Miner)
    assert "not_a_sampler" not in SAMPLERS
    assert "hard_negative_miner" not in SAMPLERS  # a miner is a tool of samplers, not a sampler

    def factory() -> int:
        return 1

    with pytest.raises(TypeError, match="factory annotated"):
        Registry("loss", "contrastive.losses.base:ContrastiveLoss").register("x")(factory)


def test_every_registered_entry_builds_its_family():
    from contrastive.registry import ENCODERS, FILTERS, INDEXES, LOSSES, MODELS, TRANSFORMS

    for reg in (SAMPLERS, LOSSES, FILTERS, INDEXES, TRANSFORMS, MODELS, ENCODERS):
        for name in reg.names():
            reg.check(name, reg.get(name))  # raises on a foreign entry


# ------------------------------------------------------------------------------------------ import isolation
def test_library_imports_neither_lightning_nor_the_application():
    code = ("import sys, json\n"
            "import contrastive.losses, contrastive.samplers, contrastive.filters, contrastive.index, contrastive.metrics\n"
            "from contrastive.registry import SAMPLERS, LOSSES, FILTERS, INDEXES\n"
            "[r.names() for r in (SAMPLERS, LOSSES, FILTERS, INDEXES)]\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'datamodules')"
            " or m in ('contrastive.cli', 'contrastive.build', 'contrastive.config') or m.startswith('contrastive.models'))\n"
            "print(json.dumps(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# ------------------------------------------------------------------------------------------ mining settings
def test_mining_settings_flat_in_yaml_typed_in_python():
    from contrastive.build import build_sampler
    from contrastive.config.validate import constructor_params
    from contrastive.samplers import MiningSettings

    s = build_sampler({"name": "faiss_hard", "num_negatives": 2, "range_max": 9,
                       "filters": [{"name": "known_duplicates"}]})
    assert s.mining == MiningSettings(num_negatives=2, range_max=9) and s.num_negatives == 2
    assert isinstance(s.filters.filters[0], KnownDuplicatesFilter)  # the spec was built by build_sampler
    params, hints = constructor_params(FaissHardNegativeSampler)
    assert {"num_negatives", "range_max", "sampling", "strict"} <= set(params) and "mining" not in params
    assert FaissHardNegativeSampler(MiningSettings(num_negatives=3)).mining.num_negatives == 3
    with pytest.raises(ValueError, match="sampler 'faiss_hard': range_max must be > range_min"):
        FaissHardNegativeSampler(range_min=5, range_max=2)
    with pytest.raises(TypeError, match="not both"):
        FaissHardNegativeSampler(MiningSettings(), num_negatives=2)
    with pytest.raises(TypeError, match="must be a NegativeFilter"):
        FaissHardNegativeSampler(filters=[{"name": "known_duplicates"}])  # YAML specs only through build_*


def test_eval_outputs_order_dedupe_and_single_positives():
    from contrastive.models import EvalOutputs

    a, c = torch.randn(4, 3), torch.randn(6, 3)
    c[5] = c[1]  # candidate id 13 seen twice (e.g. from two ranks): kept once
    o = EvalOutputs.collect(a, torch.tensor([3, 1, 2, 0]), torch.tensor([13, 11, 12, 10]), torch.arange(4), c,
                            torch.tensor([14, 13, 11, 12, 10, 13]), torch.tensor([14, 13, 11, 12, 10, 13]),
                            torch.arange(6))
    assert o.anchor_ids.tolist() == [0, 1, 2, 3] and o.candidate_ids.tolist() == [10, 11, 12, 13, 14]
    assert torch.equal(o.candidate_labels[o.positive], o.anchor_labels)
    assert torch.equal(o.anchors[0], a[3]) and torch.equal(o.candidates[3], c[1])
    several = EvalOutputs.collect(a, torch.arange(4), torch.tensor([1, 1, 2, 2]), torch.arange(4), c[:4],
                                  torch.arange(4), torch.tensor([1, 1, 2, 2]), torch.arange(4))
    assert several.positive is None  # several positives per anchor: relevance comes from the labels


def test_readme_layout_matches_the_tree():
    import re

    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):text.index("## Configs")]
    rows = [line.split("|")[1] for line in layout.splitlines() if line.startswith("| `")]
    listed = {p for row in rows for p in re.findall(r"`([^`]+)`", row)}

    def expand(path: str) -> list[str]:  # configs/{data,model}/ -> configs/data/, configs/model/
        m = re.search(r"\{([^}]*)\}", path)
        return [path[:m.start()] + part + path[m.end():] for part in m.group(1).split(",")] if m else [path]

    for path in (e for p in listed for e in expand(p)):
        assert (ROOT / path.rstrip("/")).exists(), f"README layout lists {path}, which does not exist"
    package = {f"contrastive/{p.name}" + ("/" if p.is_dir() else "") for p in (ROOT / "contrastive").iterdir()
               if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    assert package <= listed, f"not in the README layout: {sorted(package - listed)}"
    for setting in (ROOT / "datamodules").iterdir():
        if setting.is_dir() and not setting.name.startswith("_"):
            assert f"datamodules/{setting.name}/" in listed and f"configs/{setting.name}/" in listed
