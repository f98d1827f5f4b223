"""The clip setting on the shared core: one module class for code search and image–text, contract batches
with several positives and generated negatives, and the evaluator's keys."""
from __future__ import annotations

import pytest
import torch

from contrastive.build import build_encoder
from contrastive.losses import InfoNCELoss
from contrastive.models import ContrastiveBatch, ContrastiveModule
from contrastive.models.evaluation import EvalOutputs
from datamodules.clip.datamodule import ClipDataModule
from datamodules.clip.model import ClipEvaluator, ClipModule, clip_batch
from datamodules.clip.samplers import ConcretenessCaptionSampler, SceneImageSampler
from datamodules.codesearch.model import DualEncoderModule

SCENES = {"n_train": 24, "n_valid": 6, "n_test": 6, "n_zeroshot": 5}


def _train(module: ContrastiveModule, batches: list) -> list[float]:
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for b in batches:
        loss, _ = module.contrastive_step(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_code_search_and_image_text_train_through_the_same_module_class(tmp_path):
    enc = build_encoder({"name": "transformer", "dim": 32, "num_layers": 1, "num_heads": 2, "ff_dim": 64,
                         "max_length": 16}, vocab_size=50)
    code = DualEncoderModule(enc, InfoNCELoss(temperature=0.1), projection_dim=16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (8, 12), generator=g)
    code_batch = {"query_ids": ids, "query_mask": torch.ones_like(ids, dtype=torch.bool), "doc_ids": ids.flip(1),
                  "doc_mask": torch.ones_like(ids, dtype=torch.bool), "pair_id": torch.arange(8)}
    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8)
    dm.setup("fit")
    clip = ClipModule(InfoNCELoss(temperature=0.07, learnable_temperature=True, min_temperature=0.01))
    clip_batches = [b for _, b in zip(range(3), dm.train_dataloader())]
    for module, batches in ((code, [code_batch] * 3), (clip, clip_batches)):
        assert isinstance(module, ContrastiveModule)
        assert type(module).training_step is ContrastiveModule.training_step  # no per-setting copy
        before = [p.detach().clone() for p in module.parameters()]
        losses = _train(module, batches)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))


def test_clip_batches_follow_the_contract_with_several_positives_and_generated_negatives(tmp_path):
    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images")
    dm.setup("fit")
    batch = clip_batch(next(iter(dm.train_dataloader())))
    assert isinstance(batch, ContrastiveBatch) and not batch.paired
    assert set(batch.anchors) == {"pixels"} and set(batch.candidates) == {"ids", "mask"}
    pos = batch.a_labels[:, None] == batch.c_labels[None, :]
    assert (pos.sum(1) == 3).all()  # every image has its three captions as positives
    assert torch.equal(batch.a_groups, batch.c_groups[::3])  # scene-graph groups on both sides

    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, sampler=SceneImageSampler())
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    batch = clip_batch(raw)
    assert batch.has_negatives and set(batch.negatives.inputs) == {"pixels"}
    k = len(batch.negatives)
    assert 0 < k <= 8 and (batch.negatives.labels == -1).all()
    owner = batch.negatives.owner
    assert ((owner >= 0) & (owner < batch.num_anchors)).all()
    # the owner anchor is a caption of the image the negative was re-rendered from (same scene, one edit)
    assert not any(torch.equal(batch.negatives.inputs["pixels"][i], batch.candidates["pixels"][batch.a_labels[o] == batch.c_labels][0])
                   for i, o in enumerate(owner.tolist()))


def test_clip_evaluator_keys_and_a_hand_computed_case():
    # 2 images, captions 0,1 of image 0 and caption 2 of image 1; embeddings make every caption rank its image first
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cap = torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.2, 1.0]])
    labels_c = torch.tensor([0, 0, 1])
    out = EvalOutputs.collect(cap, torch.arange(3), labels_c, labels_c, img, torch.arange(2), torch.arange(2),
                              torch.arange(2))
    m = ClipEvaluator(ks=(1, 5, 10))(out, "val")
    for d in ("i2t", "t2i"):
        assert {f"{d}/R@1", f"{d}/R@5", f"{d}/R@10", f"{d}/mrr"} <= set(m)
    assert m["t2i/R@1"] == 1.0 and m["i2t/R@1"] == 1.0
    assert m["num_images"] == 2 and m["num_captions"] == 3
    cap_bad = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.2, 1.0]])  # caption 0 ranks image 1 first
    out = EvalOutputs.collect(cap_bad, torch.arange(3), labels_c, labels_c, img, torch.arange(2), torch.arange(2),
                              torch.arange(2))
    evaluator = ClipEvaluator()
    assert abs(evaluator(out, "val")["t2i/R@1"] - 2 / 3) < 1e-6
    assert evaluator.last_items == {}  # per-item outcomes only at test time
    m = evaluator(out, "test")
    # caption 0 ranks image 1 first; image 1 ties its caption 2 with caption 0 (ties count pessimistically)
    assert evaluator.last_items == {"t2i/caption_id": [0, 1, 2], "t2i/rank": [2, 1, 1],
                                    "i2t/image_id": [0, 1], "i2t/rank": [1, 2]}
    assert m["i2t/R@1"] == 0.5


def test_negative_captions_carry_their_difficulty_and_need_image_anchors(tmp_path):
    import pytest

    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images",
                        sampler=ConcretenessCaptionSampler())
    dm.setup("fit")
    batch = clip_batch(next(iter(dm.train_dataloader())))
    neg = batch.negatives
    assert neg is not None and set(neg.inputs) == {"ids", "mask"} and 0 < len(neg) <= 8
    assert neg.difficulty is not None and torch.isfinite(neg.difficulty).all()
    assert ((neg.owner >= 0) & (neg.owner < batch.num_anchors)).all()
    wrong = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="captions",
                           sampler=ConcretenessCaptionSampler())
    wrong.setup("fit")
    with pytest.raises(ValueError, match="anchors: images"):
        next(iter(wrong.train_dataloader()))


def test_several_weighted_negative_captions_per_image_reach_the_loss(tmp_path):
    base = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images",
                          sampler=ConcretenessCaptionSampler())
    base.setup("fit")
    one = next(iter(base.train_dataloader()))
    assert "neg_weight" not in one  # weight 1: no weights attached
    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images",
                        sampler=ConcretenessCaptionSampler(negatives_per_item=3, weight=2.5))
    dm.setup("fit")
    raw = next(iter(dm.train_dataloader()))
    batch = clip_batch(raw)
    neg = batch.negatives
    assert neg is not None and len(neg) > len(one["neg_owner"]) and (torch.bincount(neg.owner) <= 3).all()
    assert torch.equal(torch.unique(neg.owner), torch.unique(torch.as_tensor(one["neg_owner"])))
    assert neg.weights is not None and torch.equal(neg.weights, torch.full((len(neg),), 2.5))
    # the weight multiplies each negative's exp(s / t) in InfoNCE: 2.5 copies of every generated negative
    torch.manual_seed(0)
    module = ClipModule(InfoNCELoss(temperature=0.07, learnable_temperature=True, min_temperature=0.01))
    loss_w, _ = module.contrastive_step(raw)
    reps = torch.tensor([2, 3] * (len(neg) // 2) + [2] * (len(neg) % 2))  # each negative as 2 or 3 copies ...
    copies = {k: torch.repeat_interleave(v, reps, dim=0) if k.startswith("neg_") else v for k, v in raw.items()}
    copies["neg_weight"] = torch.repeat_interleave(2.5 / reps, reps)  # ... whose weights add up to 2.5
    loss_c, _ = module.contrastive_step(copies)
    assert torch.allclose(loss_w, loss_c, atol=1e-5)
    with pytest.raises(ValueError, match="negatives_per_item"):
        ConcretenessCaptionSampler(negatives_per_item=0)
    with pytest.raises(ValueError, match="weight"):
        ConcretenessCaptionSampler(weight=0.0)


def test_random_word_sampler_is_a_different_control(tmp_path):
    from datamodules.clip.samplers import RandomWordCaptionSampler

    negs = []
    for sampler in (ConcretenessCaptionSampler(), RandomWordCaptionSampler()):
        dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images", sampler=sampler)
        dm.setup("fit")
        negs.append(next(iter(dm.train_dataloader()))["neg_ids"])
    assert negs[0].shape != negs[1].shape or not torch.equal(negs[0], negs[1])


def test_the_loss_temperature_is_open_clips_logit_scale_with_gradient_and_clamp(tmp_path):
    """ClipModule hands open_clip's ``logit_scale`` to the core loss (``use_temperature``): the loss's own
    temperature is replaced, the parameter gets the loss's gradient (GradCache too: the same gradient),
    is clamped to ln 100 as open_clip does, and is optimised once; a loss without a temperature freezes it."""
    import math

    from contrastive.losses import CementLoss

    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    clip = ClipModule(InfoNCELoss(temperature=0.5, learnable_temperature=False))
    scale = clip.towers.model.logit_scale
    assert float(clip.loss_fn.temperature()) == pytest.approx(0.07, rel=1e-5)  # open_clip's init, not 0.5
    assert sum(p is scale for p in clip.parameters()) == 1
    opt = clip.optimizer_settings.configure(clip, 10)["optimizer"]
    assert sum(p is scale for g in opt.param_groups for p in g["params"]) == 1
    loss, logs = clip.contrastive_step(batch)
    loss.backward()
    grad = scale.grad.clone()
    assert float(grad.abs()) > 0
    assert float(logs["temperature"]) == pytest.approx(0.07, rel=1e-5)

    cached = ClipModule(InfoNCELoss(temperature=0.5), cache_chunk_size=4)
    cached.load_state_dict(clip.state_dict())
    surrogate, loss_c, _ = cached.gradcache_step(batch)
    surrogate.backward()
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-5)
    assert float(cached.towers.model.logit_scale.grad) == pytest.approx(float(grad), rel=1e-4, abs=1e-6)

    with torch.no_grad():
        scale.fill_(6.0)  # past open_clip's clamp
    _, logs = clip.contrastive_step(batch)
    assert float(logs["temperature"]) == pytest.approx(0.01, rel=1e-5)
    assert float(scale) == pytest.approx(math.log(100.0))

    margin = ClipModule(CementLoss(calibration="constant"))
    assert not margin.towers.model.logit_scale.requires_grad


def test_the_scene_seed_fixes_the_corpus_and_compositional_items_across_run_seeds(tmp_path):
    def data(seed, scene_seed=None):
        scenes = {**SCENES, **({"seed": scene_seed} if scene_seed is not None else {})}
        dm = ClipDataModule(scenes=scenes, cache_dir=str(tmp_path), batch_size=8, seed=seed)
        dm.setup("test")
        return dm.dataset("test").records, [(it.image, it.negative) for it in dm.compositional_items("test")]

    base = data(0)
    assert data(1, scene_seed=0) == base
    assert data(1) != base  # by default the run seed draws the scenes


def test_every_clip_row_shares_one_budget_and_optimiser():
    """The rows of the clip ablation differ only in where negatives come from and the loss (and the anchor
    side those need): data, model, optimiser, trainer and seed are one setting."""
    from pathlib import Path

    from contrastive.cli import load_config

    rows = sorted((Path(__file__).resolve().parents[1] / "configs" / "clip").glob("*.yaml"))
    assert len(rows) >= 6
    cfgs = {p.stem: load_config(p, []) for p in rows}
    base = cfgs["infonce"]

    def shared(cfg: dict) -> dict:
        data = {k: v for k, v in cfg["data"].items() if k != "anchors"}
        model = {k: v for k, v in cfg["model"].items() if k != "difficulty"}  # the Cement margin's input
        return {"data": data, "model": model, "optim": cfg["optim"], "trainer": cfg["trainer"], "seed": cfg["seed"]}

    for name, cfg in cfgs.items():
        assert shared(cfg) == shared(base), name
    assert {cfg["sampler"]["name"] for cfg in cfgs.values()} >= {"in_batch", "neg_captions_concreteness",
                                                                 "neg_captions_random", "neg_images"}


@pytest.mark.parametrize("seen_only", [True, False])
def test_generated_negatives_avoid_held_out_combinations(tmp_path, seen_only):
    """By default a negative caption never names a (colour, shape) that no training positive has (the
    held-out combinations of the test scenes); the switch turns the restriction off."""
    from datamodules.clip.grammar import CaptionParseError, parse_caption

    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path), batch_size=8, anchors="images",
                        sampler=ConcretenessCaptionSampler(negatives_per_item=7, seen_combinations_only=seen_only))
    dm.setup("fit")
    held = dm.corpus.held_out
    named = 0
    for _, raw in zip(range(3), dm.train_dataloader()):
        for ids in raw["neg_ids"]:
            text = dm.tokenizer.decode([int(i) for i in ids if i > 0][1:-1]).strip()  # without start/end tokens
            try:
                cap = parse_caption(text)
            except CaptionParseError:
                continue
            named += sum((np_.colour, np_.shape) in held for _, _, np_ in cap.noun_phrases())
    assert (named == 0) is seen_only


def test_caption_sampler_categories_selection_and_a_users_lexicon_from_config(tmp_path):
    """``neg_captions_concreteness`` takes its categories, selection and a user's Brysbaert-format lexicon
    from the sampler spec; the bound generator draws only those categories, with those ratings."""
    from contrastive.build import build_sampler
    from datamodules.clip.lexicon import LexiconError

    lex = tmp_path / "conc.tsv"
    lex.write_text("Word\tBigram\tConc.M\tConc.SD\nleft\t0\t4.9\t0.3\nabove\t0\t1.2\t0.5\n")
    sampler = build_sampler({"name": "neg_captions_concreteness", "negatives_per_item": 3,
                             "categories": ["replace_rel"], "selection": "uniform", "lexicon": str(lex)})
    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path / "c"), batch_size=8, anchors="images", sampler=sampler)
    dm.setup("fit")
    dm.train_dataloader()
    gen = sampler.source.generator
    assert gen.perturber.categories == ("replace_rel",) and gen.perturber.selection == "uniform"
    assert gen.perturber.lexicon.rating("left") == 4.9 and gen.perturber.lexicon.rating("circle") == 4.6  # + built-in
    scenes = gen.split.scenes
    rows = [i for i, s in enumerate(scenes) if len(s.objects) > 1][:6]
    caps = [gen.split.captions[i][0] for i in rows]
    neg = gen.text_negatives(rows, caps, per_item=3)
    assert neg.kinds and set(neg.kinds) == {"replace_rel"}
    assert (torch.bincount(neg.owner) <= 1).all()  # one category: at most one negative per item
    with pytest.raises(LexiconError, match="conc.csv"):
        bad = tmp_path / "conc.csv"
        bad.write_text("word,rating\nleft,4\n")
        build_sampler({"name": "neg_captions_concreteness", "lexicon": str(bad)})
    with pytest.raises(ValueError, match="categories"):
        build_sampler({"name": "neg_captions_concreteness", "categories": ["replace_everything"]})


def test_image_sampler_edits_from_config(tmp_path):
    """``neg_images`` takes the scene-edit kinds from the sampler spec: with ``edits: [relation]`` every
    generated image negative is a relation swap; unknown kinds are an error naming the key."""
    from contrastive.build import build_sampler

    sampler = build_sampler({"name": "neg_images", "negatives_per_item": 2, "edits": ["relation"]})
    dm = ClipDataModule(scenes=SCENES, cache_dir=str(tmp_path / "c"), batch_size=8, anchors="captions", sampler=sampler)
    dm.setup("fit")
    dm.train_dataloader()
    gen = sampler.source.generator
    assert gen.image_kinds == ("relation",)
    rows = [i for i, s in enumerate(gen.split.scenes) if len(s.objects) > 1][:6]
    neg = gen.image_negatives(rows, [gen.split.captions[i][0] for i in rows], per_item=2)
    assert neg.kinds and set(neg.kinds) == {"relation"}
    everything = build_sampler({"name": "neg_images", "negatives_per_item": 4})
    assert everything.edits == ("colour", "size", "shape", "relation")
    with pytest.raises(ValueError, match="edits"):
        build_sampler({"name": "neg_images", "edits": ["texture"]})
