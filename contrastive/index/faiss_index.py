"""FAISS backend: flat (exact), IVF-Flat, HNSW and IVF-PQ indexes, on CPU or GPU(s).

FAISS (Johnson, Douze & Jégou 2017, arXiv:1702.08734; Douze et al. 2024, "The Faiss library",
arXiv:2401.08281) is imported lazily, so the rest of the library works without it.

Behaviour worth knowing
-----------------------
- **Training.** ``ivf_flat`` and ``ivf_pq`` need k-means training. The first :meth:`FaissIndex.add`
  trains on a seeded random sample of (at most ``train_size``) of the vectors it is given, unless
  :meth:`FaissIndex.train` was called first. Fewer training vectors than ``nlist`` (or than
  ``2 ** pq_nbits`` for the PQ codebooks) **raises** a ``ValueError`` naming both numbers: silently
  shrinking ``nlist`` would change recall and speed behind the user's back. Lower ``nlist`` or train
  on more data.
- **GPU.** With ``use_gpu=True`` or ``"auto"`` and ``faiss.get_num_gpus() > 0`` the index is searched
  on GPU: one GPU through ``StandardGpuResources``, several (``gpu_ids``) sharded with
  ``index_cpu_to_gpus_list``; ``float16=True`` stores vectors/lookup tables in fp16 (which can change
  results slightly, cf. FlagEmbedding #779). The CPU index stays the source of truth: adds go to it and
  the GPU copy is re-cloned lazily on the next search; ``save`` writes it. ``use_gpu=True`` without a
  GPU (or with ``kind="hnsw"``, which FAISS cannot run on GPU) raises; ``"auto"`` falls back to CPU.
  All indexes of a process share one ``StandardGpuResources`` per GPU (:func:`gpu_resources`): each
  resources object reserves its own scratch memory (1.5 GB on a GPU with more than 8 GB), so one per
  index, re-created at every refresh, multiplies that reservation (FAISS' own advice is to share them).
- **k above the GPU limit.** FAISS' GPU k-selection supports ``k <= 2048`` (flat and IVF; a register
  budget, faiss #2103/#1384). For larger ``k`` this index **searches its CPU copy** instead and logs a
  warning once, rather than failing (as sentence-transformers' miner did, PR #3904).
- **Missing results.** Approximate indexes can return fewer than ``k`` hits for a query (e.g. IVF with
  few probed lists); those slots hold id ``-1`` and score ``-inf``.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from contrastive.index.base import (
    ArrayLike,
    Index,
    IndexFileError,
    IndexInputError,
    atomic_write,
    check_dim,
    check_k,
    check_size,
    n_rows,
    register_backend,
    write_sidecar,
)

log = logging.getLogger(__name__)

KINDS = ("flat", "ivf_flat", "hnsw", "ivf_pq")
GPU_MAX_K = 2048  # FAISS GPU k-selection limit for flat and IVF indexes
_CPU = torch.device("cpu")


def import_faiss() -> Any:
    """Import FAISS or raise an ``ImportError`` that says how to install it."""
    try:
        import faiss  # noqa: PLC0415  (optional dependency, imported on first use)
    except ImportError as e:
        raise ImportError("FAISS is not installed: pip install 'contrastive[cpu]' (or [gpu])") from e
    return faiss


_GPU_RESOURCES: dict[tuple[int, int, Optional[int]], Any] = {}


def gpu_resources(device: int, slot: int = 0, temp_memory: Optional[int] = None) -> Any:
    """The process's ``faiss.StandardGpuResources`` number ``slot`` for GPU ``device``, created on first use
    and shared by every :class:`FaissIndex` (FAISS resources objects are meant to be shared; each one
    holds its own cuBLAS handle, streams and scratch reservation). Shards of one index get distinct
    slots even on the same GPU: ``IndexShards`` searches them from concurrent threads, and a resources
    object is not thread-safe. ``temp_memory`` (bytes) sets the scratch reservation
    (``setTempMemory``; FAISS' default is 1.5 GB on a GPU with more than 8 GB, which PML users hit as
    out-of-memory errors during evaluation, PML #353/#566); resources with different settings are
    separate objects."""
    key = (int(device), int(slot), None if temp_memory is None else int(temp_memory))
    res = _GPU_RESOURCES.get(key)
    if res is None:
        res = import_faiss().StandardGpuResources()
        if temp_memory is not None:
            res.setTempMemory(int(temp_memory))
        _GPU_RESOURCES[key] = res
    return res


def faiss_num_gpus() -> int:
    """Number of GPUs FAISS can use (0 for a CPU-only build)."""
    faiss = import_faiss()
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@register_backend
class FaissIndex(Index):
    """A FAISS index behind the :class:`~contrastive.index.base.Index` interface.

    Args:
        dim: vector size.
        metric: ``"ip"`` or ``"cosine"`` (L2-normalise, then inner product).
        kind: ``"flat"`` (exact), ``"ivf_flat"``, ``"hnsw"`` or ``"ivf_pq"``.
        nlist: IVF lists (k-means centroids); about ``sqrt(N)`` to ``16 sqrt(N)`` is usual.
        nprobe: IVF lists visited per query (recall/speed knob), clipped to ``nlist``.
        hnsw_m: HNSW graph degree.
        ef_search: HNSW search beam width (raised to ``k`` when smaller, else recall collapses).
        ef_construction: HNSW build beam width.
        pq_m: PQ sub-quantizers for ``ivf_pq``; must divide ``dim`` (default ``dim // 4``: 4 dims, one
            byte each at ``pq_nbits=8``, i.e. 16x compression of float32).
        pq_nbits: bits per PQ code.
        use_gpu: ``True`` (GPU required), ``False``, or ``"auto"`` (GPU when FAISS sees one).
        gpu_ids: GPUs to use; several shard the index across them. Default: GPU 0 only.
        float16: store vectors (flat/IVF-Flat) or lookup tables (IVF-PQ) in fp16 on GPU.
        gpu_temp_memory: bytes of GPU scratch memory FAISS reserves per GPU resources object (default:
            FAISS', 1.5 GB on GPUs above 8 GB); lower it when GPU memory is tight. See :func:`gpu_resources`.
        add_chunk_size: vectors validated, normalised and added per FAISS call.
        search_chunk_size: queries per FAISS search call (bounds the ``(chunk, k)`` result buffers and
            FAISS' temporary memory).
        train_size: at most this many vectors (a seeded random sample) train IVF/PQ; default
            ``256 * nlist`` (FAISS' k-means itself caps at 256 points per centroid).
        seed: seed for the training sample and FAISS' k-means.
    """

    backend = "faiss"
    gpu_max_k: int = GPU_MAX_K

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        kind: str = "flat",
        nlist: int = 1024,
        nprobe: int = 32,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 200,
        pq_m: Optional[int] = None,
        pq_nbits: int = 8,
        use_gpu: Union[bool, str] = "auto",
        gpu_ids: Optional[Sequence[int]] = None,
        float16: bool = False,
        gpu_temp_memory: Optional[int] = None,
        add_chunk_size: int = 65536,
        search_chunk_size: int = 16384,
        train_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__(dim, metric)
        if kind not in KINDS:
            raise IndexInputError(f"kind must be one of {KINDS}; got {kind!r}")
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("hnsw_m", hnsw_m),
            ("ef_search", ef_search),
            ("ef_construction", ef_construction),
            ("pq_nbits", pq_nbits),
            ("add_chunk_size", add_chunk_size),
            ("search_chunk_size", search_chunk_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise IndexInputError(f"{name} must be a positive integer; got {value!r}")
        if use_gpu not in (True, False, "auto"):
            raise IndexInputError(f"use_gpu must be True, False or 'auto'; got {use_gpu!r}")
        pq_m = dim // 4 if pq_m is None and kind == "ivf_pq" else pq_m
        if kind == "ivf_pq" and (not pq_m or dim % pq_m):
            raise IndexInputError(f"pq_m must divide dim={dim} for kind='ivf_pq'; got pq_m={pq_m}")
        self.kind = kind
        self.nlist = nlist
        self.nprobe = min(nprobe, nlist)
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.ef_construction = ef_construction
        self.pq_m = pq_m
        self.pq_nbits = pq_nbits
        self.use_gpu = use_gpu
        self.gpu_ids = list(gpu_ids) if gpu_ids is not None else None
        self.float16 = float16
        if gpu_temp_memory is not None and (isinstance(gpu_temp_memory, bool) or not isinstance(gpu_temp_memory, int)
                                            or gpu_temp_memory < 0):
            raise IndexInputError(f"gpu_temp_memory must be a number of bytes >= 0 or None; got {gpu_temp_memory!r}")
        self.gpu_temp_memory = gpu_temp_memory
        self.add_chunk_size = add_chunk_size
        self.search_chunk_size = search_chunk_size
        self.train_size = train_size if train_size is not None else 256 * nlist
        self.seed = seed
        self._faiss = import_faiss()
        self._gpu_enabled = self._resolve_gpu()
        self._gpu: Any = None  # lazily cloned GPU copy of self._cpu
        self._gpu_resources: list[Any] = []
        self._warned_k = False
        self._cpu = self._new_cpu_index()

    # -- construction -------------------------------------------------------------------------------
    def _resolve_gpu(self) -> bool:
        if self.use_gpu is False:
            return False
        n_gpus = faiss_num_gpus()
        if self.kind == "hnsw":
            if self.use_gpu is True:
                raise IndexInputError("use_gpu=True, but FAISS has no GPU implementation of kind='hnsw'")
            return False
        if n_gpus == 0:
            if self.use_gpu is True:
                raise IndexInputError("use_gpu=True, but FAISS sees no GPU (is faiss-gpu installed?)")
            return False
        bad = [g for g in (self.gpu_ids or [0]) if not 0 <= g < n_gpus]
        if bad:
            raise IndexInputError(f"gpu_ids {bad} do not exist: FAISS sees {n_gpus} GPU(s)")
        return True

    def _new_cpu_index(self) -> Any:
        faiss = self._faiss
        ip = faiss.METRIC_INNER_PRODUCT
        if self.kind == "flat":
            return faiss.IndexFlatIP(self.dim)
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, ip)
            index.hnsw.efConstruction = self.ef_construction
            return index
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, ip)
        else:
            index = faiss.IndexIVFPQ(quantizer, self.dim, self.nlist, self.pq_m, self.pq_nbits, ip)
        index.cp.seed = self.seed  # the FAISS python wrapper keeps `quantizer` alive with the index
        if self.kind == "ivf_pq":
            index.pq.cp.seed = self.seed
        return index

    @property
    def on_gpu(self) -> bool:
        """Whether searches (with ``k <= gpu_max_k``) run on GPU."""
        return self._gpu_enabled

    @property
    def is_trained(self) -> bool:
        return bool(self._cpu.is_trained)

    @property
    def min_train_size(self) -> int:
        """Fewest training vectors accepted: ``nlist`` (and ``2 ** pq_nbits`` for IVF-PQ codebooks)."""
        if self.kind == "ivf_flat":
            return self.nlist
        if self.kind == "ivf_pq":
            return max(self.nlist, 2**self.pq_nbits)
        return 0

    # -- vectors ------------------------------------------------------------------------------------
    def train(self, x: ArrayLike) -> None:
        """Train IVF centroids / PQ codebooks on ``x`` (a seeded sample of at most ``train_size`` rows)."""
        if self.kind in ("flat", "hnsw"):
            return
        if len(self):
            raise IndexInputError(f"{self.kind} index already holds {len(self)} vectors; reset() before re-training")
        n = n_rows(x, "training vectors")
        if n > self.train_size:
            g = torch.Generator().manual_seed(self.seed)
            pick = torch.randperm(n, generator=g)[: self.train_size].sort().values
            x = x[pick.numpy()] if isinstance(x, np.ndarray) else x[pick.to(x.device)]
        t = self._prepare(x, "training vectors", _CPU)
        if t.shape[0] < self.min_train_size:
            need = f"nlist={self.nlist}"
            if self.kind == "ivf_pq":
                need = f"max(nlist={self.nlist}, 2**pq_nbits={2**self.pq_nbits})"
            raise IndexInputError(
                f"kind={self.kind!r} needs at least {need} = {self.min_train_size} training vectors; got "
                f"{t.shape[0]}. Lower nlist (about sqrt(N) is a fair start) or train on more vectors."
            )
        self._cpu.train(t.numpy())
        self._gpu = None

    def add(self, x: ArrayLike) -> None:
        n = n_rows(x, "added vectors")
        if not self._cpu.is_trained:
            self.train(x if x.ndim == 2 else x.reshape(1, -1))
        for start in range(0, n, self.add_chunk_size):
            part = x[start : start + self.add_chunk_size] if x.ndim == 2 else x
            t = self._prepare(part, "added vectors", _CPU, offset=len(self))
            self._cpu.add(t.numpy())
        self._gpu = None  # re-cloned on the next search

    def search(self, queries: ArrayLike, k: int, allow_fewer: bool = False) -> tuple[Tensor, Tensor]:
        k = check_k(k, len(self), allow_fewer)
        q = self._prepare(queries, "queries", _CPU)
        index = self._searcher(k)
        self._set_search_params(index, k)
        scores = np.empty((q.shape[0], k), dtype=np.float32)
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], self.search_chunk_size):
            d, i = index.search(q[start : start + self.search_chunk_size].numpy(), k)
            scores[start : start + d.shape[0]] = d
            ids[start : start + i.shape[0]] = i
        scores_t, ids_t = torch.from_numpy(scores), torch.from_numpy(ids)
        scores_t[ids_t < 0] = float("-inf")  # FAISS pads missing results with id -1 and a sentinel score
        return scores_t, ids_t

    def _searcher(self, k: int) -> Any:
        """The index to search with: the GPU copy, or the CPU index when off GPU or ``k > gpu_max_k``."""
        if not self._gpu_enabled:
            return self._cpu
        if k > self.gpu_max_k:
            if not self._warned_k:
                log.warning(
                    "k=%d exceeds the FAISS GPU limit of %d for kind=%r: searching the CPU copy instead (slower)",
                    k,
                    self.gpu_max_k,
                    self.kind,
                )
                self._warned_k = True
            return self._cpu
        return self._gpu_index()

    def _gpu_index(self) -> Any:
        if self._gpu is None:
            faiss = self._faiss
            ids = self.gpu_ids or [0]
            self._gpu_resources = [gpu_resources(g, ids[:j].count(g), self.gpu_temp_memory) for j, g in enumerate(ids)]
            if len(ids) == 1:
                co = faiss.GpuClonerOptions()
                co.useFloat16 = self.float16
                self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources[0], ids[0], self._cpu, co)
            else:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = True
                co.useFloat16 = self.float16
                self._gpu = faiss.index_cpu_to_gpu_multiple_py(self._gpu_resources, self._cpu, co=co, gpus=ids)
        return self._gpu

    def _set_search_params(self, index: Any, k: int) -> None:
        faiss = self._faiss
        if self.kind in ("ivf_flat", "ivf_pq"):
            on_gpu = index is not self._cpu and hasattr(faiss, "GpuParameterSpace")
            space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
            space.set_index_parameter(index, "nprobe", self.nprobe)
        elif self.kind == "hnsw":
            index.hnsw.efSearch = max(self.ef_search, k)

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def reset(self) -> None:
        """Remove all vectors and any training (IVF centroids, PQ codebooks)."""
        self._cpu = self._new_cpu_index()
        self._gpu = None

    # -- persistence --------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Constructor arguments that define the index (GPU placement excluded)."""
        return {
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
            "pq_m": self.pq_m,
            "pq_nbits": self.pq_nbits,
            "add_chunk_size": self.add_chunk_size,
            "search_chunk_size": self.search_chunk_size,
            "train_size": self.train_size,
            "seed": self.seed,
        }

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the CPU index with ``faiss.write_index`` (temp file + rename) and the JSON sidecar."""
        atomic_write(path, lambda tmp: self._faiss.write_index(self._cpu, tmp))
        meta = {"backend": self.backend, "dim": self.dim, "metric": self.metric, "size": len(self), **self.config()}
        write_sidecar(path, meta)

    @classmethod
    def _load(cls, path: Union[str, os.PathLike], meta: dict[str, Any], **overrides: Any) -> "FaissIndex":
        faiss = import_faiss()
        kwargs = {k: meta[k] for k in cls._config_keys() if k in meta}
        kwargs.update(overrides)
        index = cls(int(meta["dim"]), meta["metric"], **kwargs)
        try:
            cpu = faiss.read_index(str(path))
        except Exception as e:  # FAISS raises RuntimeError with its C++ message
            raise IndexFileError(f"cannot load index {path}: not a readable FAISS index ({e})") from None
        check_dim(path, int(cpu.d), int(meta["dim"]))
        check_size(path, int(cpu.ntotal), meta)
        index._cpu = cpu
        return index

    @staticmethod
    def _config_keys() -> tuple[str, ...]:
        return (
            "kind",
            "nlist",
            "nprobe",
            "hnsw_m",
            "ef_search",
            "ef_construction",
            "pq_m",
            "pq_nbits",
            "add_chunk_size",
            "search_chunk_size",
            "train_size",
            "seed",
        )

    def __repr__(self) -> str:
        where = "gpu" if self._gpu_enabled else "cpu"
        return f"FaissIndex(kind={self.kind!r}, dim={self.dim}, metric={self.metric!r}, size={len(self)}, {where})"
