"""Evaluation of image–text towers: retrieval in both directions with several captions per image,
zero-shot classification with prompt templates, compositional accuracy per perturbation category, and
a reader for SugarCrepe's released files.

Retrieval (:func:`image_text_retrieval`): image->text ranks all captions for each image, text->image all
images for each caption; an image and a caption are relevant iff their labels (image ids) are equal, so
every caption of an image counts as a hit. The metric values come from the core's multi-positive
``contrastive.metrics.two_way_retrieval_metrics`` (keys ``mrr``, ``success@k`` — the "R@k" of image-text
papers —, ``recall@k``, ``ndcg@10``, ``map``).

Zero-shot (:func:`zero_shot_classifier`, :func:`zero_shot_accuracy`): each class's text embedding is the
normalised mean of its normalised prompt embeddings over ``templates`` (CLIP, Radford et al. 2021); an
image is assigned the class of highest cosine score.

Compositional accuracy (:func:`compositional_accuracy`), SugarCrepe's protocol (Hsieh et al., NeurIPS
2023 D&B, arXiv 2306.14610): an item is correct iff ``score(image, caption) > score(image, negative)``
(strictly: a tie is wrong); accuracy per category = correct / items; chance is 0.5.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from contrastive.metrics import two_way_retrieval_metrics
from datamodules.clip.loaders import BadRecords, ImageTextDataError, ImageTextDataset, ImageTextRecord, read_json
from datamodules.clip.perturb import CATEGORIES, CaptionPerturber
from datamodules.clip.scenes import SceneSplit

SUGARCREPE_CATEGORIES: tuple[str, ...] = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel",
                                          "swap_obj", "swap_att")
#: prompt templates inside the scene grammar (the tower never saw other wording)
SCENE_TEMPLATES: tuple[str, ...] = ("a {}", "there is a {}", "a picture of a {}")
#: CLIP-style templates for a user's images
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.")


# ------------------------------------------------------------------------------------- encoding

@torch.no_grad()
def encode_texts(text_tower: nn.Module, tokenizer: Callable[[list[str]], Tensor], texts: Sequence[str],
                 batch_size: int = 256, device: torch.device | str | None = None) -> Tensor:
    """``(len(texts), d)`` embeddings, the tower in eval mode."""
    device = device or next(text_tower.parameters()).device
    was = text_tower.training
    text_tower.eval()
    out = [text_tower({"ids": tokenizer(list(texts[i:i + batch_size])).to(device)}).float().cpu()
           for i in range(0, len(texts), batch_size)]
    text_tower.train(was)
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def encode_images(image_tower: nn.Module, images: Sequence[Tensor] | Tensor, batch_size: int = 256,
                  device: torch.device | str | None = None) -> Tensor:
    """``(N, d)`` embeddings of preprocessed ``(3, H, W)`` images, the tower in eval mode."""
    device = device or next(image_tower.parameters()).device
    was = image_tower.training
    image_tower.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        pixels = chunk if isinstance(chunk, Tensor) else torch.stack(list(chunk))
        out.append(image_tower({"pixels": pixels.to(device)}).float().cpu())
    image_tower.train(was)
    return torch.cat(out) if out else torch.empty(0, 0)


def dataset_images(dataset: ImageTextDataset) -> tuple[list[Tensor], Tensor]:
    """Each record's preprocessed image once (records whose image fails to load are left out) and the
    image ids of those kept."""
    pixels, ids = [], []
    for rec in dataset.records:
        img = dataset.load_image(rec)
        if img is not None:
            pixels.append(dataset.transform(img))
            ids.append(rec.image_id)
    return pixels, torch.tensor(ids, dtype=torch.long)


@dataclass
class EncodedSplit:
    """``image_emb (N_img, d)`` with ``image_ids (N_img,)``; ``text_emb (N_cap, d)`` with
    ``text_image_ids (N_cap,)``, the image each caption describes."""

    image_emb: Tensor
    image_ids: Tensor
    text_emb: Tensor
    text_image_ids: Tensor


def encode_dataset(image_tower: nn.Module, text_tower: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                   dataset: ImageTextDataset, batch_size: int = 256) -> EncodedSplit:
    """Every image once and every caption once."""
    pixels, image_ids = dataset_images(dataset)
    texts = [c for rec in dataset.records for c in rec.captions]
    return EncodedSplit(encode_images(image_tower, pixels, batch_size), image_ids,
                        encode_texts(text_tower, tokenizer, texts, batch_size), dataset.caption_image_ids)


# ------------------------------------------------------------------------------------ retrieval

def image_text_retrieval(image_emb: Tensor, text_emb: Tensor, image_labels: Tensor, text_labels: Tensor,
                         **kwargs: Any) -> dict[str, float]:
    """``{"i2t/<metric>": ..., "t2i/<metric>": ...}`` from exact multi-positive ranks
    (:func:`contrastive.metrics.two_way_retrieval_metrics`); an image ``(A, d)`` and a caption ``(B, d)``
    are relevant iff their labels are equal, so several captions per image are several relevant
    documents for the image query. ``kwargs`` (``ks``, ``ties``, ``chunk_size``) go to the metrics."""
    out = two_way_retrieval_metrics(image_emb, text_emb, image_labels, text_labels, names=("i", "t"), **kwargs)
    return {k.replace("i_to_t/", "i2t/").replace("t_to_i/", "t2i/"): float(v) for k, v in out.items()}


def first_relevant_ranks(query_emb: Tensor, doc_emb: Tensor, query_labels: Tensor, doc_labels: Tensor,
                         chunk_size: int = 4096) -> Tensor:
    """``(Q,)`` long: the 1-based rank of each query's best-ranked relevant document (document ``j`` is
    relevant to query ``i`` iff their labels are equal; ties pessimistic, as the metrics count them), so
    ``rank <= k`` is the query's success@k (the R@k of :func:`image_text_retrieval`); a query without a
    relevant document gets ``N + 1``."""
    from contrastive.metrics.ranks import relevant_ranks

    rr = relevant_ranks(query_emb, doc_emb, query_labels, doc_labels, chunk_size=chunk_size)
    out = torch.full((query_emb.shape[0],), doc_emb.shape[0] + 1, dtype=torch.long, device=rr.rank.device)
    return out.scatter_reduce(0, rr.query.long(), rr.rank.long(), reduce="amin").cpu()


# ------------------------------------------------------------------------------------ zero-shot

def zero_shot_classifier(text_tower: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                         class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES) -> Tensor:
    """``(C, d)``: per class, the normalised mean of the normalised embeddings of its prompts."""
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one template")
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = F.normalize(encode_texts(text_tower, tokenizer, prompts), dim=-1)
    return F.normalize(emb.view(len(class_names), len(templates), -1).mean(1), dim=-1)


def zero_shot_accuracy(image_emb: Tensor, labels: Tensor, classifier: Tensor,
                       ks: Sequence[int] = (1,)) -> dict[str, float]:
    """``{"top<k>": accuracy}``: the share of images whose class is among the ``k`` best-scoring classes
    (cosine score; ties broken towards the lower class index)."""
    scores = F.normalize(image_emb.float(), dim=-1) @ classifier.float().T
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return {f"top{k}": float((order[:, :k] == labels[:, None]).any(1).float().mean()) for k in ks}


def evaluate_zero_shot(image_tower: nn.Module, text_tower: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                       dataset: ImageTextDataset, class_names: Sequence[str],
                       templates: Sequence[str] = DEFAULT_TEMPLATES, ks: Sequence[int] = (1,),
                       batch_size: int = 256) -> dict[str, float]:
    """Zero-shot accuracy over the images of ``dataset`` whose records carry a class ``label`` (the
    generated ``zeroshot`` split, or :func:`read_image_folder`)."""
    pixels, image_ids = dataset_images(dataset)
    labels = torch.tensor([dataset.records[int(i)].label for i in image_ids], dtype=torch.long)
    if len(labels) == 0 or bool((labels < 0).any()):
        raise ValueError("zero-shot evaluation needs images with class labels (label >= 0)")
    clf = zero_shot_classifier(text_tower, tokenizer, class_names, templates)
    return zero_shot_accuracy(encode_images(image_tower, pixels, batch_size), labels, clf, ks)


def read_image_folder(root: str | os.PathLike) -> tuple[list[ImageTextRecord], list[str]]:
    """A torchvision ImageFolder tree (``root/<class>/<image>``) as records (``label`` = class index,
    the caption the class name with ``_`` as spaces) and the class names."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    try:
        classes, to_idx = find_classes(str(root))
        samples = make_dataset(str(root), to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as e:
        raise ImageTextDataError(f"{root}: not an image folder ({e})") from None
    names = [c.replace("_", " ") for c in classes]
    recs = [ImageTextRecord(path, [names[label]], i, i, label, path) for i, (path, label) in enumerate(samples)]
    return recs, names


# ------------------------------------------------------------------------------- compositional

def compositional_correct(image_emb: Tensor, caption_emb: Tensor, negative_emb: Tensor) -> Tensor:
    """``(N,)`` bool: item ``i``'s image scores its caption strictly above its negative (cosine scores);
    row ``i`` of the three ``(N, d)`` tensors is item ``i``."""
    if not (len(image_emb) == len(caption_emb) == len(negative_emb)):
        raise ValueError("image, caption and negative embeddings need one row per item")
    img = F.normalize(image_emb.float(), dim=-1)
    pos = (img * F.normalize(caption_emb.float(), dim=-1)).sum(-1)
    neg = (img * F.normalize(negative_emb.float(), dim=-1)).sum(-1)
    return pos > neg


def compositional_accuracy(image_emb: Tensor, caption_emb: Tensor, negative_emb: Tensor,
                           categories: Sequence[str]) -> dict[str, float]:
    """Per category, the share of items whose image scores its caption strictly above the negative
    (:func:`compositional_correct`); ``"mean"`` is the unweighted mean over the categories present."""
    if len(categories) != len(image_emb):
        raise ValueError("image, caption and negative embeddings and categories need one row per item")
    correct = compositional_correct(image_emb, caption_emb, negative_emb).numpy()
    cats = np.asarray(categories)
    out = {c: float(correct[cats == c].mean()) for c in dict.fromkeys(categories)}
    if out:
        out["mean"] = float(np.mean(list(out.values())))
    return out


@dataclass
class CompositionalItem:
    """An image (path, or index into an image array), its caption, a negative caption and the category."""

    image: str | int
    caption: str
    negative: str
    category: str
    source: str = ""


def read_sugarcrepe(data_root: str | os.PathLike, image_root: str | os.PathLike,
                    categories: Sequence[str] | None = None, bad: BadRecords | None = None,
                    check_files: bool = True) -> list[CompositionalItem]:
    """SugarCrepe's released format: ``<data_root>/<category>.json``, each a dict from an index to
    ``{"filename", "caption", "negative_caption"}``, images under ``image_root`` (COCO val2017).

    ``categories`` defaults to the seven SugarCrepe files that exist (at least one must); a category
    asked for explicitly must have its file. Errors name the file and the index."""
    data_root, image_root = Path(data_root), Path(image_root)
    bad = bad or BadRecords()
    if categories is None:
        categories = [c for c in SUGARCREPE_CATEGORIES if (data_root / f"{c}.json").is_file()]
        if not categories:
            raise ImageTextDataError(f"{data_root}: no SugarCrepe file ({', '.join(SUGARCREPE_CATEGORIES)}.json)")
    items = []
    for cat in categories:
        path = data_root / f"{cat}.json"
        data = read_json(path, "SugarCrepe file")
        if not isinstance(data, dict):
            raise ImageTextDataError(f"{path}: a SugarCrepe file maps an index to an item")
        for idx, it in data.items():
            where = f"{path}: item {idx!r}"
            missing = [k for k in ("filename", "caption", "negative_caption") if not isinstance(it, dict) or k not in it]
            if missing:
                raise ImageTextDataError(f"{where} lacks {missing}")
            if check_files and not (image_root / it["filename"]).is_file():
                bad.report(where, f"image {it['filename']!r} not found under {image_root}")
                continue
            items.append(CompositionalItem(it["filename"], it["caption"], it["negative_caption"], cat, where))
    return items


def scene_compositional_items(split: SceneSplit, perturber: CaptionPerturber | None = None, seed: int = 0,
                              categories: Sequence[str] = CATEGORIES) -> list[CompositionalItem]:
    """For every scene and every category: the scene's first caption and one negative of that category
    that is false for the scene (scenes without a candidate of a category are left out of it)."""
    perturber = perturber or CaptionPerturber()
    rng = np.random.default_rng([seed, 104729])
    items = []
    for i, (scene, caps) in enumerate(zip(split.scenes, split.captions)):
        for cat in categories:
            neg = perturber.perturb(caps[0], rng, category=cat, scene=scene)
            if neg is not None:
                items.append(CompositionalItem(i, caps[0], neg.text, cat, f"scene {i}"))
    return items


def evaluate_compositional(image_tower: nn.Module, text_tower: nn.Module, tokenizer: Callable[[list[str]], Tensor],
                           items: Sequence[CompositionalItem], transform: Callable[[Image.Image], Tensor],
                           image_root: str | os.PathLike | None = None, images: np.ndarray | None = None,
                           batch_size: int = 256, per_item: bool = False) -> dict[str, Any]:
    """Compositional accuracy per category of ``items`` (SugarCrepe files or generated scenes); each image
    is encoded once. Returns the accuracies and ``"items"``: the number of items per category; with
    ``per_item`` also ``"correct"``: one bool per item, in the order of ``items``."""
    loader = ImageTextDataset([], transform, image_root=image_root, images=images, bad=BadRecords("raise"))
    keys = list(dict.fromkeys(it.image for it in items))
    index = {k: i for i, k in enumerate(keys)}
    pixels = [transform(loader.load_image(ImageTextRecord(k, [], source=str(k)))) for k in keys]
    img = encode_images(image_tower, pixels, batch_size)
    texts = encode_texts(text_tower, tokenizer, [t for it in items for t in (it.caption, it.negative)], batch_size)
    rows = torch.tensor([index[it.image] for it in items], dtype=torch.long)
    cats = [it.category for it in items]
    acc: dict[str, Any] = compositional_accuracy(img[rows], texts[0::2], texts[1::2], cats)
    acc["items"] = {c: cats.count(c) for c in dict.fromkeys(cats)}
    if per_item:
        acc["correct"] = compositional_correct(img[rows], texts[0::2], texts[1::2]).tolist()
    return acc
