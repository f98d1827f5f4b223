"""Gradient caching for contrastive batches larger than memory (GradCache: Gao, Zhang, Han, Callan,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021, arXiv 2101.06983).

The full-batch loss ``L(f(x_1), ..., f(x_B))`` is differentiated in three stages whose peak memory is
bounded by one chunk, while the gradient is exactly the full-batch one:

1. :func:`encode_without_grad`: encode the inputs in chunks without a graph, recording each chunk's RNG
   state (CPU and, for CUDA tensors, CUDA) so that dropout can be replayed identically.
2. :func:`chunked_loss_grads`: from detached embeddings (leaves), compute the loss and ``dL/d(embedding)``.
   Optionally in **anchor-row chunks** so that not even the ``(B, M)`` similarity matrix is materialised
   (:func:`loss_chunk_rows` sizes them so that a ``(rows, M)`` block is no larger than ``chunk²``):
   each chunk's loss ``loss_fn(anchors[rows], candidates, masks[rows], ...)`` is differentiated right away
   and its gradients accumulated, weighted by ``|rows| / B``. This is exact for any loss that is the mean
   over anchors of per-anchor terms that each depend only on their own row (every built-in loss:
   InfoNCE/DCL/HCL, Soft-InfoNCE, Cement, their weighted sums; symmetric losses when the reverse
   direction has the same ``B`` anchors and is chunked with the same rows). When some anchor has no
   negative (the built-in losses skip such anchors, which changes the mean's denominator) it falls back to
   one full chunk, which is always exact.
3. :func:`replay_backward`: re-encode every chunk *with* a graph (restoring its RNG state) and
   differentiate ``sum(emb_chunk * grad_chunk)``; the gradients of all chunks but the last are summed
   with :func:`torch.autograd.grad` into a side buffer and folded, together with the last chunk, into one
   **surrogate** scalar whose gradient is the full-batch gradient.

Why a side buffer instead of ``backward()`` into ``param.grad``: under Lightning's automatic optimisation
the closure runs ``training_step`` **before** ``optimizer.zero_grad()`` and before ``backward``
(``lightning/pytorch/loops/optimization/automatic.py``, ``Closure.closure``), so gradients written into
``.grad`` inside ``training_step`` would be wiped at the first micro-batch of every accumulation window.
Folding them into the returned surrogate lets Lightning's own backward write everything, with its loss
normalisation (``accumulate_grad_batches``), AMP scaling and, under DDP, a single gradient
synchronisation (no ``no_sync`` is needed because no earlier backward touches ``.grad``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from contrastive.losses.base import ContrastiveInputs, ContrastiveLoss

MakeInputs = Callable[[Sequence[Tensor], slice], "tuple[ContrastiveInputs, Optional[ContrastiveInputs]]"]


# ---------------------------------------------------------------------------------------------- RNG
class RngState:
    """Snapshot of the CPU RNG and, when ``device`` is a CUDA device, of that device's RNG.

    ``restore()`` puts both back, so a dropout forward can be replayed bit for bit (the approach of
    :mod:`torch.utils.checkpoint`). Other accelerators' generators are not captured."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


# ---------------------------------------------------------------------------------------------- stage 1
@dataclass
class EncodedChunks:
    """Output of :func:`encode_without_grad`.

    Attributes:
        encode: the encoder callable, ``encode(*inputs_chunk) -> (n, d)``.
        inputs: per chunk, the tuple of input slices.
        rng: per chunk, the RNG state captured just before it was encoded.
        embeddings: ``(N, d)`` detached embeddings of all chunks, concatenated in order.
    """

    encode: Callable[..., Tensor]
    inputs: list[tuple[Tensor, ...]]
    rng: list[RngState]
    embeddings: Tensor
    sizes: list[int] = field(default_factory=list)


def chunk_slices(n: int, chunk_size: Optional[int]) -> list[slice]:
    """``[slice(0, c), slice(c, 2c), ...]`` covering ``range(n)``; one slice when ``chunk_size`` is None."""
    if chunk_size is not None and int(chunk_size) <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None; got {chunk_size}")
    c = n if chunk_size is None else int(chunk_size)
    return [slice(s, min(s + c, n)) for s in range(0, n, max(c, 1))] or [slice(0, 0)]


def encode_without_grad(encode: Callable[..., Tensor], inputs: Sequence[Tensor],
                        chunk_size: Optional[int]) -> EncodedChunks:
    """Stage 1: encode ``inputs`` (tensors sharing their first dimension ``N``) in chunks, without a graph.

    Returns the ``(N, d)`` detached embeddings and, per chunk, the inputs and the RNG state to replay."""
    n = inputs[0].shape[0]
    device = inputs[0].device
    chunks, states, outs, sizes = [], [], [], []
    with torch.no_grad():
        for sl in chunk_slices(n, chunk_size):
            part = tuple(t[sl] for t in inputs)
            states.append(RngState(device))
            outs.append(encode(*part))
            chunks.append(part)
            sizes.append(sl.stop - sl.start)
    return EncodedChunks(encode, chunks, states, torch.cat(outs).detach(), sizes)


# ---------------------------------------------------------------------------------------------- stage 2
@dataclass
class ChunkedLoss:
    """Output of :func:`chunked_loss_grads`.

    Attributes:
        loss: the detached full-batch loss value (scalar).
        logs: the loss's logs, averaged over chunks with weights ``|rows| / B`` (exact for per-anchor
            means such as ``acc``; approximate for ratios such as ``neg_sim``).
        grads: ``dL/dt`` for every input tensor ``t`` (``None`` for tensors that do not require grad).
        param_grads: ``dL/dp`` for every parameter in ``params`` (``None`` where unused).
        num_chunks: the number of row chunks actually used (1 after a fallback).
    """

    loss: Tensor
    logs: dict[str, Tensor]
    grads: list[Optional[Tensor]]
    param_grads: list[Optional[Tensor]]
    num_chunks: int


def _call_loss(loss_fn: ContrastiveLoss, inputs: ContrastiveInputs, reverse: Optional[ContrastiveInputs]):
    return loss_fn(inputs.anchors, inputs.candidates, inputs.positive_mask, weights=inputs.weights,
                   false_negative_mask=inputs.false_negative_mask, difficulty=inputs.difficulty,
                   similarity_estimate=inputs.similarity_estimate, reverse=reverse)


def _every_anchor_has_negative(inputs: Optional[ContrastiveInputs]) -> bool:
    if inputs is None:
        return True
    neg = inputs.negative_mask()
    if inputs.weights is not None:
        neg = neg & (inputs.weights > 0)
    return bool(neg.any(dim=1).all())


def chunked_loss_grads(loss_fn: ContrastiveLoss, tensors: Sequence[Tensor], make_inputs: MakeInputs,
                       num_rows: int, chunk_size: Optional[int], params: Sequence[Tensor] = ()) -> ChunkedLoss:
    """Stage 2: the loss and its gradient w.r.t. ``tensors`` (embeddings) and ``params`` (e.g. a learnable
    temperature), computed in anchor-row chunks of ``chunk_size`` (``None``: one chunk).

    Args:
        loss_fn: any :class:`ContrastiveLoss`.
        tensors: the embedding tensors the loss reads (e.g. ``[anchors (B, d), candidates (M, d)]``); each
            is replaced by a detached leaf before ``make_inputs`` sees it.
        make_inputs: ``make_inputs(leaves, rows) -> (inputs, reverse)``: the loss inputs of anchor rows
            ``rows`` (anchors sliced to ``rows``, candidates complete, ``(B, M)`` tensors sliced to
            ``rows``), and the reverse direction's inputs for the same rows (or ``None``). Building masks
            here lazily keeps memory at ``chunk × M`` instead of ``B × M``.
        num_rows: ``B``, the number of anchor rows (both directions must have ``B`` anchors).
        chunk_size: rows per chunk; ``None`` or ``>= B`` computes the loss in one go.
        params: parameters of the loss that need a gradient.

    Returns:
        :class:`ChunkedLoss`. ``param.grad`` is never touched.
    """
    leaves = [t.detach().requires_grad_() if t.requires_grad else t.detach() for t in tensors]
    rows_list = chunk_slices(num_rows, chunk_size)
    result = _accumulate(loss_fn, leaves, make_inputs, num_rows, rows_list, list(params), check=len(rows_list) > 1)
    if result is None:  # some anchor has no negative: the loss skips it, which changes the mean; be exact
        result = _accumulate(loss_fn, leaves, make_inputs, num_rows, [slice(0, num_rows)], list(params), check=False)
    assert result is not None
    return result


def loss_chunk_rows(chunk_size: Optional[int], num_candidates: int) -> Optional[int]:
    """Anchor rows per loss chunk so that a ``(rows, M)`` block has at most ``chunk_size²`` entries, i.e.
    the loss of any batch size needs no more memory than the similarity block of one encoder chunk
    (``None`` stays ``None``: one chunk)."""
    if chunk_size is None:
        return None
    return max(1, (int(chunk_size) * int(chunk_size)) // max(1, int(num_candidates)))


def _accumulate(loss_fn: ContrastiveLoss, leaves: list[Tensor], make_inputs: MakeInputs, num_rows: int,
                rows_list: list[slice], params: list[Tensor], check: bool) -> Optional[ChunkedLoss]:
    diff_idx = [i for i, t in enumerate(leaves) if t.requires_grad]
    grads: list[Optional[Tensor]] = [None] * len(leaves)
    pgrads: list[Optional[Tensor]] = [None] * len(params)
    total: Optional[Tensor] = None
    logs: dict[str, Tensor] = {}
    for rows in rows_list:
        w = (rows.stop - rows.start) / num_rows
        inp, rev = make_inputs(leaves, rows)
        if check and not (_every_anchor_has_negative(inp) and _every_anchor_has_negative(rev)):
            return None
        with torch.enable_grad():
            out = _call_loss(loss_fn, inp, rev)
            targets = [leaves[i] for i in diff_idx] + params
            got = (torch.autograd.grad(out.loss * w, targets, allow_unused=True) if out.loss.requires_grad
                   else (None,) * len(targets))
        for k, i in enumerate(diff_idx):
            grads[i] = _add(grads[i], got[k])
        for k in range(len(params)):
            pgrads[k] = _add(pgrads[k], got[len(diff_idx) + k])
        value = out.loss.detach() * w
        total = value if total is None else total + value
        for key, v in out.logs.items():
            v = v.detach().float() * w
            logs[key] = v if key not in logs else logs[key] + v
    assert total is not None
    return ChunkedLoss(total, logs, grads, pgrads, len(rows_list))


def _add(acc: Optional[Tensor], g: Optional[Tensor]) -> Optional[Tensor]:
    """``acc + g`` accumulated in place into a buffer owned here (``g`` may be a view autograd shares)."""
    if g is None:
        return acc
    if acc is None:
        return g.clone(memory_format=torch.contiguous_format)
    return acc.add_(g)


def needs_reverse(loss_fn: nn.Module) -> bool:
    """Whether ``loss_fn`` or any loss inside it (e.g. a component of a weighted sum) is symmetric, so that
    the reverse direction's inputs must be passed explicitly for non-square problems."""
    return any(isinstance(m, ContrastiveLoss) and m.symmetric for m in loss_fn.modules())


def slice_rows(inputs: ContrastiveInputs, rows: slice, anchors: Tensor, candidates: Tensor) -> ContrastiveInputs:
    """Inputs of anchor rows ``rows``: ``anchors[rows]`` against all ``candidates``, every ``(B, M)``
    tensor sliced to ``rows``; a ``None`` positive mask (candidate i is anchor i's positive) becomes the
    explicit ``(|rows|, M)`` mask with the diagonal shifted by ``rows.start``."""
    pos = inputs.positive_mask
    if pos is None:
        b, m = anchors.shape[0], candidates.shape[0]
        if m < b:
            raise ValueError(f"positive_mask is None but there are {m} candidates for {b} anchors")
        r = torch.arange(rows.start, rows.stop, device=anchors.device)
        pos = torch.zeros(len(r), m, dtype=torch.bool, device=anchors.device)
        pos[torch.arange(len(r), device=anchors.device), r] = True
    else:
        pos = pos[rows]
    cut = lambda x: None if x is None else x[rows]  # noqa: E731
    return ContrastiveInputs(anchors[rows], candidates, pos, cut(inputs.weights), cut(inputs.false_negative_mask),
                             cut(inputs.difficulty), cut(inputs.similarity_estimate))


def _implicit_reverse_rows(inputs: ContrastiveInputs, rows: slice, anchors: Tensor,
                           candidates: Tensor) -> ContrastiveInputs:
    """Rows ``rows`` of :meth:`ContrastiveInputs.reversed` (square problems only): ``candidates[rows]``
    against all ``anchors``, each ``(B, M)`` tensor's columns ``rows`` transposed."""
    b, m = anchors.shape[0], candidates.shape[0]
    if b != m:
        raise ValueError(f"the implicit reverse direction needs a square problem; got {b} anchors, {m} candidates")
    col = lambda x: None if x is None else x[:, rows].transpose(0, 1)  # noqa: E731
    pos = inputs.positive_mask
    if pos is None:
        r = torch.arange(rows.start, rows.stop, device=anchors.device)
        pos = torch.zeros(len(r), b, dtype=torch.bool, device=anchors.device)
        pos[torch.arange(len(r), device=anchors.device), r] = True
    else:
        pos = col(pos)
    return ContrastiveInputs(candidates[rows], anchors, pos, col(inputs.weights), col(inputs.false_negative_mask),
                             col(inputs.difficulty), col(inputs.similarity_estimate))


def chunked_inputs_loss_grads(loss_fn: ContrastiveLoss, inputs: ContrastiveInputs, chunk_size: Optional[int],
                              reverse: Optional[ContrastiveInputs] = None,
                              params: Sequence[Tensor] = ()) -> ChunkedLoss:
    """:func:`chunked_loss_grads` for ready-made inputs. ``grads`` are ``[d anchors, d candidates]`` plus
    ``[d reverse.anchors, d reverse.candidates]`` when ``reverse`` is given.

    For symmetric losses without ``reverse`` the problem must be square and the reverse direction is
    :meth:`ContrastiveInputs.reversed`, chunked by the same rows. Note that full ``(B, M)`` masks passed in
    ``inputs`` already cost ``B × M`` memory; pass ``positive_mask=None`` or use
    :func:`chunked_loss_grads` with lazily built masks to stay at ``chunk × M``.
    """
    b = inputs.anchors.shape[0]
    tensors = [inputs.anchors, inputs.candidates]
    if reverse is not None:
        if reverse.anchors.shape[0] != b:
            raise ValueError(f"reverse direction must have the same number of anchors ({b}); "
                             f"got {reverse.anchors.shape[0]}")
        tensors += [reverse.anchors, reverse.candidates]
    symmetric = needs_reverse(loss_fn)

    def make(leaves: Sequence[Tensor], rows: slice) -> tuple[ContrastiveInputs, Optional[ContrastiveInputs]]:
        fwd = slice_rows(inputs, rows, leaves[0], leaves[1])
        if reverse is not None:
            return fwd, slice_rows(reverse, rows, leaves[2], leaves[3])
        if symmetric:
            return fwd, _implicit_reverse_rows(inputs, rows, leaves[0], leaves[1])
        return fwd, None

    return chunked_loss_grads(loss_fn, tensors, make, b, chunk_size, params)


# ---------------------------------------------------------------------------------------------- stage 3
def replay_backward(parts: Sequence[tuple[EncodedChunks, Tensor]], params: Sequence[Tensor]) -> Optional[Tensor]:
    """Stage 3: re-encode every chunk with a graph (restoring its RNG state) and return a scalar whose
    gradient w.r.t. ``params`` is ``sum_chunks d/dθ sum(emb_chunk * grad_chunk)``, i.e. the full-batch
    gradient of the loss through the encoders.

    All chunks but the last are differentiated here with :func:`torch.autograd.grad` (so their graphs
    are freed chunk by chunk) and their parameter gradients ``g`` summed into a side buffer that enters the
    result as ``sum(p * g)``; the last chunk enters with its graph. ``param.grad`` is not touched; call
    ``backward()`` on the result (Lightning does it on the value returned by ``training_step``).

    Args:
        parts: ``(chunks, grad)`` pairs: the output of :func:`encode_without_grad` and ``dL/d embeddings``
            ``(N, d)`` for it. Parts whose grad is ``None`` are skipped.
        params: the parameters to differentiate (those that require grad).

    Returns:
        The surrogate scalar, or ``None`` when there is nothing to differentiate. The global RNG state is
        left as it was when this function was called.
    """
    params = [p for p in params if p.requires_grad]
    work: list[tuple[Callable[..., Tensor], tuple[Tensor, ...], RngState, Tensor]] = []
    for chunks, grad in parts:
        if grad is None:
            continue
        start = 0
        for inp, st, n in zip(chunks.inputs, chunks.rng, chunks.sizes):
            work.append((chunks.encode, inp, st, grad[start:start + n]))
            start += n
    if not work or not params:
        return None
    device = work[0][1][0].device
    after = RngState(device)
    stash: list[Optional[Tensor]] = [None] * len(params)
    surrogate: Optional[Tensor] = None
    try:
        for k, (encode, inp, st, g) in enumerate(work):
            st.restore()
            with torch.enable_grad():
                emb = encode(*inp)
                term = (emb * g.to(emb.dtype)).sum()
            if k < len(work) - 1:
                got = torch.autograd.grad(term, params, allow_unused=True)
                stash = [_add(s, x) for s, x in zip(stash, got)]
            else:
                surrogate = term
    finally:
        after.restore()
    assert surrogate is not None
    for p, s in zip(params, stash):
        if s is not None:
            surrogate = surrogate + (p * s).sum()
    return surrogate
