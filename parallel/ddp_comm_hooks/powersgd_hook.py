"""PowerSGD gradient compression (Vogels et al. 2019, https://arxiv.org/abs/1905.13727).

Each parameter gradient of a bucket is viewed as a matrix M (n × m: first dim × the rest). With
rank r, one power-iteration step approximates the *average* of the ranks' M by P̂ Qᵀ:

    M ← M + e                       error feedback: add what compression lost last step
    P = M Q                         (n × r)  Q: shared warm-started (m × r), same on every rank
    P ← Σ_ranks P                   all-reduce #1 (async; overlaps backward)
    P̂ = orthonormalise(P)           fp32 QR, identical on every rank (same input)
    Q = Mᵀ P̂;  Q ← Σ_ranks Q        all-reduce #2 (in ``wait()``)
    M̃ = P̂ Qᵀ / N                    = P̂ P̂ᵀ · mean(M): the mean projected on r directions
    e = M - M̃                       kept per rank for the next step

Bytes sent per matrix: r(n + m) instead of n·m. A matrix is sent uncompressed (in one shared
all-reduce with the bucket's vectors) when r(n + m)·min_compression_rate ≥ n·m, i.e. when
compression would not save enough. Before ``start_iter`` every bucket is plainly all-reduced
(early gradients change fast; the paper's warm-up). At full rank (r ≥ min(n, m)) P̂ P̂ᵀ projects
on the whole column space of mean(M), so the result equals the plain average.

State (error buffers, Q, the RNG that draws fresh Q's, the iteration counter) is per rank and
round-trips through ``state_dict`` / ``load_state_dict``, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from parallel.dist_context import all_reduce
from parallel.ddp_comm_hooks.default_hooks import GradBucket, PendingReduction, allreduce_hook


def should_compress(shape: torch.Size, rank: int, min_compression_rate: float) -> bool:
    """True when a tensor of ``shape`` is worth compressing at ``rank`` (pure; see module doc)."""
    if len(shape) < 2:
        return False
    n, m = shape[0], math.prod(shape[1:])
    r = min(rank, n, m)
    return r * (n + m) * min_compression_rate < n * m


class PowerSGDHook:
    """Stateful PowerSGD comm hook; call it like any hook: ``hook(bucket) -> PendingReduction``.

    Args:
        matrix_approximation_rank: r, the number of directions kept per matrix.
        start_iter: plain all-reduce for the first ``start_iter`` synchronisations.
        min_compression_rate: compress only when n·m / (r(n+m)) exceeds this.
        use_error_feedback: carry the compression error into the next step.
        warm_start: reuse last step's Q (one extra power iteration per step for free).
        seed: seeds the Q initialisation; identical on all ranks (Q must be shared).
    """

    def __init__(
        self,
        matrix_approximation_rank: int = 1,
        start_iter: int = 10,
        min_compression_rate: float = 2.0,
        use_error_feedback: bool = True,
        warm_start: bool = True,
        seed: int = 0,
    ) -> None:
        assert matrix_approximation_rank >= 1, matrix_approximation_rank
        self.rank = matrix_approximation_rank
        self.start_iter = start_iter
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = use_error_feedback
        self.warm_start = warm_start
        self.iteration = 0
        self.rng = torch.Generator().manual_seed(seed)
        self.errors: dict[int, torch.Tensor] = {}
        self.qs: dict[int, list[torch.Tensor]] = {}

    def __call__(self, bucket: GradBucket) -> PendingReduction:
        if self.iteration < self.start_iter:
            pending = allreduce_hook(bucket)
        else:
            pending = self._compress(bucket)
        if bucket.is_last:
            self.iteration += 1
        return pending

    def _new_q(self, m: int, r: int, device: torch.device) -> torch.Tensor:
        return torch.randn(m, r, generator=self.rng, dtype=torch.float32).to(device)

    def _compress(self, bucket: GradBucket) -> PendingReduction:
        buf, world = bucket.buffer, bucket.world_size
        work = buf.float() if buf.dtype != torch.float32 else buf  # fp32 maths throughout
        if self.use_error_feedback:
            if bucket.index in self.errors:  # .to(): a loaded checkpoint may sit on the CPU
                self.errors[bucket.index] = self.errors[bucket.index].to(work.device)
                work.add_(self.errors[bucket.index])
            local = work.clone()

        matrices, vectors, vector_ranges = [], [], []
        for r, shape in zip(bucket.param_ranges, bucket.param_shapes, strict=True):
            view = work[r.start : r.end]
            if should_compress(shape, self.rank, self.min_compression_rate):
                matrices.append(view.view(shape[0], -1))
            else:
                vectors.append(view)
                vector_ranges.append(r)

        first = bucket.index not in self.qs or not self.warm_start
        if first:
            self.qs[bucket.index] = [
                self._new_q(m.shape[1], min(self.rank, *m.shape), m.device) for m in matrices
            ]
        qs = self.qs[bucket.index] = [q.to(work.device) for q in self.qs[bucket.index]]
        ps = [m @ q for m, q in zip(matrices, qs, strict=True)]
        flat_p = torch.cat([p.flatten() for p in ps]) if ps else work.new_zeros(0)
        flat_v = torch.cat(vectors) if vectors else work.new_zeros(0)
        # one all-reduce for all P's, one for the uncompressed tensors (skipped when empty;
        # every rank has the same layout, so every rank skips the same ones)
        works = [all_reduce(t, world, async_op=True) for t in (flat_p, flat_v) if t.numel()]

        def finish() -> torch.Tensor:
            _unflatten_into(flat_v, vectors, scale=1.0 / world)
            _unflatten_into(flat_p, ps)
            for i, (m, p) in enumerate(zip(matrices, ps, strict=True)):
                ps[i] = torch.linalg.qr(p, mode="reduced").Q
                qs[i] = m.T @ ps[i]
            if qs:
                flat_q = torch.cat([q.flatten() for q in qs])
                all_reduce(flat_q, world)
                _unflatten_into(flat_q, qs)
            for m, p, q in zip(matrices, ps, qs, strict=True):
                torch.matmul(p, q.T, out=m)
                m.mul_(1.0 / world)
            if not torch.isfinite(work).all():
                # An overflowed step (fp16 loss scaling): the optimizer skips it. Its inf/nan
                # must not stay in the error feedback or the warm-start Q, or every later step
                # would be non-finite too. The reduced values are the same on every rank, so
                # all ranks drop both and draw the next Q alike.
                self.errors.pop(bucket.index, None)
                self.qs.pop(bucket.index, None)
            elif self.use_error_feedback:
                error = local.sub_(work)
                for r in vector_ranges:  # sent exactly: nothing lost, nothing to feed back
                    error[r.start : r.end] = 0
                self.errors[bucket.index] = error
            if work is not buf:
                buf.copy_(work)
            return buf

        return PendingReduction(works, finish)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: per-rank errors, Q's, RNG and iteration."""
        return {
            "iteration": self.iteration,
            "rng_state": self.rng.get_state(),
            "errors": {k: v.clone() for k, v in self.errors.items()},
            "qs": {k: [q.clone() for q in v] for k, v in self.qs.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.rng.set_state(state["rng_state"])
        self.errors = {int(k): v.clone() for k, v in state["errors"].items()}
        self.qs = {int(k): [q.clone() for q in v] for k, v in state["qs"].items()}


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor], scale: float = 1.0) -> None:
    """Copy consecutive slices of ``flat`` (times ``scale``) back into ``tensors`` in place."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        if scale != 1.0:
            t.mul_(scale)
        offset += t.numel()

