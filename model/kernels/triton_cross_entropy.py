"""Cross-entropy as Triton kernels: a fused "linear + cross-entropy" and a plain one on logits.

References they must equal (sum over the rows whose target is not ``ignore_index``, fp32)::

    def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100):
        logits = (hidden @ weight.T).float()                     # (N, V)
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")

    def cross_entropy_sum_ref(logits, targets, ignore_index=-100):
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")

Why fused: the logits of a whole batch are large (16k tokens x 64k vocab is 4 GiB in fp32).
``linear_cross_entropy`` never holds them. It walks the rows in chunks; per chunk it

1. computes the chunk's logits ``h @ W.T`` with torch into one reused ``(C, V)`` buffer
   (in the compute dtype, e.g. bf16),
2. runs ``_lse_loss_kernel``: one program per row, an online logsumexp over the vocab in blocks
   of ``BLOCK_V`` (any V, the last block is masked), then ``loss = lse - logit[target]``,
3. runs ``_softmax_grad_kernel``, which overwrites the buffer in place with
   ``dlogits = softmax - onehot(target)`` (zero rows for ignored targets),
4. accumulates ``grad_hidden[chunk] = dlogits @ W`` and ``grad_weight += dlogits.T @ h``.

Steps 1-3 are this module's ``_triton_chunk_step``; the loop and step 4 are shared with the torch
reference (``torch_ref.chunked_linear_cross_entropy``), which does steps 1-3 in torch ops.

So the gradients are finished during the forward pass (Liger-style "fused linear cross-entropy");
backward only scales them by the incoming ``grad_output``.

Memory bound (on top of inputs): the logits buffer, ``C * V`` elements of the compute dtype with
``C = max(1, MAX_CHUNK_LOGITS // V)`` rows (2**25 elements: 64 MiB in bf16, 128 MiB in fp32,
whatever N is), plus the gradients themselves: ``grad_hidden`` ``(N, D)`` in the compute dtype and
``grad_weight`` ``(V, D)`` accumulated in fp32 so that many chunks do not pile up bf16 rounding
(with a low-precision compute dtype, one more ``(V, D)`` tensor in that dtype holds each chunk's
product before it is added).
Without grad (evaluation) only the buffer and a ``(C,)`` fp32 loss vector are allocated.

Under autocast the matmuls run in the autocast dtype (as ``F.linear`` would) and the softmax in
fp32; gradients come back in the inputs' own dtypes.

Targets outside ``[0, V)`` that are not ``ignore_index`` raise ``ValueError`` (a host check,
one device synchronisation per call, skipped under torch.compile) instead of reading
out-of-bounds memory.
"""

import torch
import triton
import triton.language as tl

from model.kernels.torch_ref import LinearCrossEntropyFunction, matmul_dtype
from model.kernels.triton_utils import cast_rtne

# Largest vocab block one program holds in registers at a time (tests lower it to exercise the
# multi-block loop with small vocabularies).
MAX_BLOCK_V = 4096
# Elements in one chunk's logits buffer; sets the rows per chunk, see the module docstring.
MAX_CHUNK_LOGITS = 2**25


@triton.jit
def _lse_loss_kernel(
    logits_ptr, stride, targets_ptr, loss_ptr, lse_ptr, V, ignore_index, BLOCK_V: tl.constexpr
):
    """Per row: lse = logsumexp(logits[row]), loss = lse - logits[row, target] (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    m = tl.full([], float("-inf"), tl.float32)  # running max
    s = tl.full([], 0.0, tl.float32)  # running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    x_target = tl.load(base + tl.where(ignored, 0, target)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, lse - x_target))


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, stride, grad_ptr, grad_stride, targets_ptr, lse_ptr, scale_ptr, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    """Per row: grad = scale * (softmax(logits) - onehot(target)); 0 for ignored rows.

    ``grad_ptr`` may alias ``logits_ptr``: each element is read before it is written, by the same
    program. ``scale_ptr`` points at one fp32 value (grad_output), so no host sync is needed.
    """
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(scale_ptr))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(logits_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        grad = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * scale
        grad = cast_rtne(grad, grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + row * grad_stride + cols, grad, mask=mask)


def _launch_lse_loss(logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor,
                     lse: torch.Tensor, ignore_index: int) -> None:
    """Fill ``loss`` and ``lse`` (fp32, (R,)) for ``logits`` (R, V) with unit stride along V."""
    rows, V = logits.shape
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _lse_loss_kernel[(rows,)](
        logits, logits.stride(0), targets, loss, lse, V, ignore_index, BLOCK_V=block,
        num_warps=min(16, max(1, block // 256)),
    )


def _launch_softmax_grad(logits: torch.Tensor, grad: torch.Tensor, targets: torch.Tensor,
                         lse: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> None:
    """Write ``scale * (softmax - onehot)`` of ``logits`` (R, V) into ``grad`` (may alias it)."""
    rows, V = logits.shape
    block = min(MAX_BLOCK_V, triton.next_power_of_2(V))
    _softmax_grad_kernel[(rows,)](
        logits, logits.stride(0), grad, grad.stride(0), targets, lse, scale, V, ignore_index,
        BLOCK_V=block, num_warps=min(16, max(1, block // 256)),
    )


def _check_targets(targets: torch.Tensor, n_rows: int, V: int, ignore_index: int) -> None:
    if targets.shape != (n_rows,):
        raise ValueError(f"cross-entropy: targets {tuple(targets.shape)} vs {n_rows} rows")
    if torch.compiler.is_compiling():  # the check syncs with the device: no graph break for it
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        raise ValueError(f"cross-entropy: a target is outside [0, {V}) and not {ignore_index}")


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
        rows = logits.shape[0]
        loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        if rows > 0:
            _launch_lse_loss(logits, targets, loss, lse, ignore_index)
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index = ignore_index
        return loss.sum()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        if logits.shape[0] > 0:
            scale = grad_output.detach().float().reshape(1)
            _launch_softmax_grad(logits, grad, targets, lse, scale, ctx.ignore_index)
        return grad, None, None


def cross_entropy_sum(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` (..., V) against ``targets`` (...), fp32 scalar.

    Rows whose target is ``ignore_index`` contribute 0. The softmax runs in fp32 whatever the
    logits dtype; the gradient has the logits' dtype.
    """
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    targets = targets.reshape(-1)
    _check_targets(targets, logits2.shape[0], V, ignore_index)
    return _CrossEntropySum.apply(logits2, targets, ignore_index)


def _triton_chunk_step(weight: torch.Tensor, ignore_index: int, need_grad: bool, chunk_rows: int):
    """Per chunk (the loop is ``torch_ref.chunked_linear_cross_entropy``): the logits into one
    reused (C, V) buffer, the per-row loss by ``_lse_loss_kernel``, then ``dlogits`` written over
    the logits in place by ``_softmax_grad_kernel``."""
    dev, V = weight.device, weight.shape[0]
    logits_buf = torch.empty(chunk_rows, V, dtype=weight.dtype, device=dev)
    loss = torch.empty(chunk_rows, dtype=torch.float32, device=dev)
    lse = torch.empty(chunk_rows, dtype=torch.float32, device=dev)
    one = torch.ones(1, dtype=torch.float32, device=dev)

    def step(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = h.shape[0]
        logits = logits_buf[:rows]  # (C, V)
        torch.mm(h, weight.T, out=logits)
        _launch_lse_loss(logits, t, loss[:rows], lse, ignore_index)
        if not need_grad:
            return loss[:rows].sum(), None
        _launch_softmax_grad(logits, logits, t, lse, one, ignore_index)  # in place
        return loss[:rows].sum(), logits

    return step


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding all logits.

    hidden: (N, D); weight: (V, D), the LM head; targets: (N,) int64. Returns an fp32 scalar, the
    sum over rows with ``target != ignore_index`` (divide by their count for the mean). See the
    module docstring for the chunking and its memory bound.
    """
    N, D = hidden.shape
    V = weight.shape[0]
    assert weight.shape == (V, D), f"linear_cross_entropy: weight {tuple(weight.shape)} vs D={D}"
    targets = targets.reshape(-1)
    _check_targets(targets, N, V, ignore_index)
    device_type = hidden.device.type
    dtype = matmul_dtype(hidden)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    # The .to() casts sit outside the Function so autograd returns grads in the callers' dtypes.
    hidden, weight = hidden.to(dtype).contiguous(), weight.to(dtype).contiguous()
    chunk_rows = max(1, min(N, MAX_CHUNK_LOGITS // V))
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, chunk_rows, need_grad,
            _triton_chunk_step(weight, ignore_index, need_grad, chunk_rows), targets,
        )
