"""NGAME: negative-mining-aware mini-batching (Dahiya et al., WSDM 2023, arXiv 2207.04452; methods.md §B1).

Instead of retrieving extra negatives, NGAME *builds the batches* so that in-batch negatives are hard.
Following the official code (``ngame/libs/shortlist.py`` ``ClusteringIndex``, pyxclib
``cluster_balance`` / ``b_kmeans_dense``; §B1(b)):

- **Clustering** (at a refresh): embed every training point with the current encoder (here the query,
  the document or their normalised sum: ``cluster_on``), L2-normalise, and split into
  ``K = 2^ceil(log2(N / C))`` balanced clusters by recursive balanced 2-means: starting from one
  cluster, every cluster is split in two exactly equal halves (sizes differ by at most 1) until there
  are ``K``. One split: two distinct random points as centroids; repeat {order the points by
  ``<x, c1> - <x, c0>``, cut the order in two halves, set each centroid to its half's normalised mean}
  until the mean within-half cosine improves by less than ``tol``. Every final cluster has
  ``floor`` or ``ceil`` of ``N / K`` points, so the *realised* cluster size is in ``(C/2, C]``.
- **Batches** (every epoch, :meth:`NGAMESampler.batch_order`): shuffle the clusters, concatenate their
  members (in their recorded order) and cut the sequence into consecutive batches
  (``packing="concat"``, the official recipe: a cluster may straddle two batches). ``packing="whole"``
  instead packs whole clusters into batches of at most ``batch_size`` (clusters larger than a batch are
  cut), so no cluster is split between batches but batch sizes vary.
- **Curriculum**: the nominal cluster size in epoch ``e`` is
  ``init_cluster_size * 2^#{c in curriculum_epochs : c <= e}``; re-clustering happens before epoch ``e``
  when ``e >= curriculum_epochs[0]`` and ``e % refresh_interval == 0`` (official defaults
  ``[10, 20, 25, 50, 75, 100, 125, 150, 200]`` and 5). A cluster size of 1 means random batches, which
  is also what is used before the first refresh. The clusters of the last refresh are reshuffled every
  epoch until the next one.

:class:`NGAMESampler` adds no extra negatives (``num_negatives = 0``): the model's in-batch negatives
*are* the mined ones. Each refresh also records, for the quality report, the ``report_negatives``
highest-scoring cluster-mates of every query (the hardest batch-mates it can get).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from contrastive.registry import SAMPLERS
from contrastive.samplers.base import Encode, RefreshSchedule
from contrastive.samplers.table import MinedTable, TableSampler, utc_now

log = logging.getLogger(__name__)

DEFAULT_CURRICULUM = (10, 20, 25, 50, 75, 100, 125, 150, 200)


def _split_balanced(x: Tensor, generator: torch.Generator, tol: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """One balanced 2-means split of the normalised rows ``x`` ``(n, d)``, ``n >= 2`` → two index tensors
    of sizes ``floor(n/2)`` and ``ceil(n/2)``."""
    n = x.shape[0]
    i0, i1 = torch.randperm(n, generator=generator)[:2].tolist()
    c0, c1 = x[i0].clone(), x[i1].clone()
    prev = -math.inf
    half = n // 2
    order = torch.arange(n)
    for _ in range(max_iter):
        diff = x @ (c1 - c0)
        order = torch.argsort(diff, stable=True)
        a, b = order[:half], order[half:]
        c0 = torch.nn.functional.normalize(x[a].mean(dim=0), dim=0)
        c1 = torch.nn.functional.normalize(x[b].mean(dim=0), dim=0)
        sim = float(((x[a] @ c0).sum() + (x[b] @ c1).sum()) / n)
        if sim - prev < tol:
            break
        prev = sim
    return order[:half], order[half:]


def balanced_clusters(x: Tensor, num_clusters: int, seed: int = 0, tol: float = 1e-4, max_iter: int = 100) -> list[Tensor]:
    """Recursive balanced 2-means (pyxclib ``cluster_balance``; see the module docstring).

    Args:
        x: ``(N, d)`` embeddings (normalised here).
        num_clusters: a power of two ``<= N``.

    Returns:
        ``num_clusters`` long tensors of row indices, a partition of ``0..N-1``; sizes differ by at most 1.
    """
    n = x.shape[0]
    if num_clusters < 1 or num_clusters & (num_clusters - 1):
        raise ValueError(f"num_clusters must be a power of two; got {num_clusters}")
    if num_clusters > n:
        raise ValueError(f"num_clusters={num_clusters} is larger than the {n} points")
    x = torch.nn.functional.normalize(x.detach().float().cpu(), dim=1)
    g = torch.Generator().manual_seed(int(seed))
    clusters = [torch.arange(n)]
    while len(clusters) < num_clusters:
        nxt = []
        for c in clusters:
            a, b = _split_balanced(x[c], g, tol, max_iter)
            nxt += [c[a], c[b]]
        clusters = nxt
    return clusters


@SAMPLERS.register("ngame")
class NGAMESampler(TableSampler):
    """Cluster-based mini-batches whose in-batch negatives are hard (NGAME; module docstring).

    Args:
        init_cluster_size: nominal cluster size before the first curriculum epoch (official: 1).
        curriculum_epochs: epochs from which the nominal cluster size doubles (sorted, positive).
        refresh_interval: re-cluster before epoch ``e`` when ``e >= curriculum_epochs[0]`` and
            ``e % refresh_interval == 0`` (the refresh callback follows :meth:`should_refresh`).
        cluster_on: what is embedded and clustered: ``"query"`` (the training points, NGAME's
            ``batch_type="doc"``), ``"document"`` (the positives) or ``"pair"`` (normalised sum of both).
        packing: ``"concat"`` (official: shuffled clusters concatenated and cut into batches) or
            ``"whole"`` (whole clusters packed into batches of at most ``batch_size``; sizes vary).
        tol, max_iter: stopping rule of each 2-means split.
        report_negatives: hardest cluster-mates recorded per query for the quality report (0 = none,
            which also skips encoding the documents when ``cluster_on="query"``).
        exclude_duplicates: leave known duplicates out of the reported cluster-mates (they are masked
            in the loss by ``dup_group`` anyway).
        seed: seed of the clustering (per refresh: ``seed + epoch``).
    """

    name = "ngame"
    needs_model = True

    def __init__(
        self,
        init_cluster_size: int = 1,
        curriculum_epochs: Sequence[int] = DEFAULT_CURRICULUM,
        refresh_interval: int = 5,
        cluster_on: Literal["query", "document", "pair"] = "query",
        packing: Literal["concat", "whole"] = "concat",
        tol: float = 1e-4,
        max_iter: int = 100,
        report_negatives: int = 16,
        exclude_duplicates: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(num_negatives=0, exclude_duplicates=exclude_duplicates, seed=seed)
        if isinstance(init_cluster_size, bool) or not isinstance(init_cluster_size, int) or init_cluster_size < 1:
            raise ValueError(f"sampler 'ngame': init_cluster_size must be an integer >= 1; got {init_cluster_size!r}")
        cur = [int(c) for c in curriculum_epochs]
        if any(c < 1 for c in cur) or cur != sorted(cur):
            raise ValueError(f"sampler 'ngame': curriculum_epochs must be sorted positive epochs; got {list(curriculum_epochs)}")
        if not cur and init_cluster_size == 1:
            raise ValueError("sampler 'ngame': with empty curriculum_epochs, init_cluster_size must be > 1 "
                             "(a cluster size of 1 is plain random batching)")
        if isinstance(refresh_interval, bool) or not isinstance(refresh_interval, int) or refresh_interval < 1:
            raise ValueError(f"sampler 'ngame': refresh_interval must be an integer >= 1; got {refresh_interval!r}")
        if cluster_on not in ("query", "document", "pair"):
            raise ValueError(f"sampler 'ngame': cluster_on must be 'query', 'document' or 'pair'; got {cluster_on!r}")
        if packing not in ("concat", "whole"):
            raise ValueError(f"sampler 'ngame': packing must be 'concat' or 'whole'; got {packing!r}")
        if tol < 0 or max_iter < 1:
            raise ValueError(f"sampler 'ngame': tol must be >= 0 and max_iter >= 1; got tol={tol}, max_iter={max_iter}")
        if isinstance(report_negatives, bool) or not isinstance(report_negatives, int) or report_negatives < 0:
            raise ValueError(f"sampler 'ngame': report_negatives must be an integer >= 0; got {report_negatives!r}")
        self.init_cluster_size, self.curriculum_epochs = init_cluster_size, cur
        self.refresh_interval, self.cluster_on, self.packing = refresh_interval, cluster_on, packing
        self.tol, self.max_iter, self.report_negatives = float(tol), int(max_iter), report_negatives
        self.clusters: Optional[list[Tensor]] = None
        self.clustered_size: Optional[int] = None
        self.last_stats: dict[str, float] = {}

    # -- schedule -----------------------------------------------------------------------------------
    def cluster_size_at(self, epoch: int) -> int:
        """Nominal cluster size ``C`` of ``epoch``: ``init * 2^#{c in curriculum_epochs : c <= epoch}``."""
        return self.init_cluster_size * 2 ** sum(c <= epoch for c in self.curriculum_epochs)

    @property
    def first_refresh_epoch(self) -> int:
        return self.curriculum_epochs[0] if self.curriculum_epochs else self.refresh_interval

    @property
    def refresh_schedule(self) -> RefreshSchedule:
        return RefreshSchedule(every_n_epochs=self.refresh_interval, every_n_steps=None,
                               start_epoch=self.first_refresh_epoch)

    def should_refresh(self, epoch: int) -> bool:
        """Re-cluster before ``epoch`` (NGAME: ``epoch >= curriculum_epochs[0]`` and ``epoch % refresh_interval == 0``)."""
        return epoch >= self.first_refresh_epoch and epoch % self.refresh_interval == 0

    def num_clusters_for(self, cluster_size: int) -> int:
        """``K = 2^ceil(log2(N / C))`` (at most ``N``)."""
        n = self.num_rows
        k = 1 << max(0, math.ceil(math.log2(max(1.0, n / cluster_size))))
        return min(k, 1 << int(math.floor(math.log2(n)))) if k > n else k

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "init_cluster_size": self.init_cluster_size,
                "curriculum_epochs": self.curriculum_epochs, "refresh_interval": self.refresh_interval,
                "cluster_on": self.cluster_on, "packing": self.packing, "tol": self.tol, "max_iter": self.max_iter,
                "report_negatives": self.report_negatives}

    def cache_context(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cluster_size": self.cluster_size_at(self.epoch)}

    # -- refresh ------------------------------------------------------------------------------------
    def refresh(self, encode: Encode, step: int) -> dict[str, float]:
        """Re-cluster the training points with the current model at the nominal size of :attr:`epoch`."""
        self._check_ready()
        n = self.num_rows
        c = self.cluster_size_at(self.epoch)
        k = self.num_clusters_for(c)
        need_docs = self.cluster_on != "query" or self.report_negatives > 0
        need_queries = self.cluster_on != "document" or self.report_negatives > 0
        all_rows = torch.arange(n)
        q = torch.nn.functional.normalize(encode(all_rows, "anchor").detach().float().cpu(), dim=1) if need_queries else None
        d = torch.nn.functional.normalize(encode(all_rows, "candidate").detach().float().cpu(), dim=1) if need_docs else None
        for what, e in (("query", q), ("document", d)):
            if e is not None and (e.dim() != 2 or e.shape[0] != n):
                raise ValueError(f"sampler 'ngame': the {what} encoder returned shape {tuple(e.shape)}, expected ({n}, d)")
        x = q if self.cluster_on == "query" else d if self.cluster_on == "document" else q + d
        if k >= n or c <= 1:
            clusters = None
        else:
            clusters = balanced_clusters(x, k, seed=self.seed + self.epoch, tol=self.tol, max_iter=self.max_iter)
        table = self._table_from(clusters, q, d, step)
        self.set_table(table)
        return dict(self.last_stats)

    def _table_from(self, clusters: Optional[list[Tensor]], q: Optional[Tensor], d: Optional[Tensor], step: int) -> MinedTable:
        n = self.num_rows
        order = torch.cat(clusters) if clusters else torch.arange(n)
        sizes = torch.tensor([len(c) for c in clusters]) if clusters else torch.ones(n, dtype=torch.long)
        rows = torch.arange(n)
        r = self.report_negatives
        neg = torch.full((n, r), -1, dtype=torch.long)
        scores = torch.full((n, r), float("nan"))
        before_neg, before_scores = neg.clone(), scores.clone()
        pos = torch.full((n,), float("nan"))
        intra = float("nan")
        if clusters and q is not None and d is not None:
            pos = (q * d).sum(dim=1)
            sims = []
            for members in clusters:
                s = q[members] @ d[members].T  # (c, c): query i vs cluster-mates' documents
                s.fill_diagonal_(float("-inf"))
                take = min(r, len(members) - 1)
                # "before": the hardest cluster-mates as they are; "after": known duplicates left out
                # (the loss masks them through dup_group), so the report shows the measured FN rate
                for out_n, out_s, sc in ((before_neg, before_scores, s),
                                         (neg, scores, s.masked_fill(self.same_group(members, members.expand(len(members), -1)),
                                                                     float("-inf")) if self.exclude_duplicates else s)):
                    if take > 0:
                        v, j = sc.topk(take, dim=1)
                        ok = torch.isfinite(v)
                        out_n[members, :take] = torch.where(ok, members[j], torch.full_like(j, -1))
                        out_s[members, :take] = torch.where(ok, v, torch.full_like(v, float("nan")))
                xm = q[members] if self.cluster_on == "query" else d[members]
                sims.append(float((xm @ xm.T).mean()))
            intra = sum(sims) / len(sims)
        c = self.cluster_size_at(self.epoch)
        self.last_stats = {
            "cluster_size_nominal": float(c),
            "num_clusters": float(len(clusters) if clusters else n),
            "cluster_size_mean": float(n / (len(clusters) if clusters else n)),
            "cluster_size_min": float(sizes.min()),
            "cluster_size_max": float(sizes.max()),
            "intra_cluster_cosine": intra,
        }
        header = {"sampler": {"name": self.name, "settings": self.settings()},
                  "corpus": {"size": n, "fingerprint": self.corpus_fingerprint()}, "created": utc_now(),
                  "stats": self.last_stats, "info": {"epoch": self.epoch, "step": int(step), "clustered": clusters is not None}}
        return MinedTable(query_rows=rows, neg_rows=neg, scores=scores, positive_scores=pos, pair_ids=self.pair_ids,
                          dup_group=self.dup_group, header=header,
                          extras={"cluster_order": order, "cluster_sizes": sizes, "before_neg_rows": before_neg,
                                  "before_scores": before_scores})

    def set_table(self, table: MinedTable) -> None:
        """Install a refresh's table; its ``cluster_order`` / ``cluster_sizes`` extras define the clusters."""
        super().set_table(table)
        order, sizes = table.extras.get("cluster_order"), table.extras.get("cluster_sizes")
        if order is None or sizes is None:
            raise ValueError("sampler 'ngame': the table has no cluster_order / cluster_sizes (not an NGAME table)")
        clustered = bool(table.header.get("info", {}).get("clustered", int(sizes.max()) > 1))
        self.clusters = list(torch.split(order.long(), sizes.long().tolist())) if clustered else None
        self.clustered_size = int(table.header.get("stats", {}).get("cluster_size_nominal", 1)) if clustered else None
        if table.header.get("stats"):
            self.last_stats = {k: float(v) for k, v in table.header["stats"].items()}

    # -- batches ------------------------------------------------------------------------------------
    def batch_order(self, epoch: int, batch_size: int, generator: torch.Generator) -> Optional[list[list[int]]]:
        """The batches of ``epoch``: shuffled clusters, concatenated and cut (``"concat"``) or packed whole
        (``"whole"``); ``None`` (plain shuffle) before the first clustering."""
        if self.clusters is None:
            return None
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        perm = torch.randperm(len(self.clusters), generator=generator).tolist()
        if self.packing == "concat":
            seq = torch.cat([self.clusters[i] for i in perm]).tolist()
            return [seq[i:i + batch_size] for i in range(0, len(seq), batch_size)]
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in perm:
            members = self.clusters[i].tolist()
            for start in range(0, len(members), batch_size):
                piece = members[start:start + batch_size]
                if len(cur) + len(piece) > batch_size:
                    batches.append(cur)
                    cur = []
                cur = cur + piece
        if cur:
            batches.append(cur)
        return batches
