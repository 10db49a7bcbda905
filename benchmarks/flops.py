"""FLOPs of one I-JEPA training step, and the machine's measured matmul peak.

Counted from the model shapes and the step's actual mask sizes (docs/design.md §5), matrix
products only (2 FLOPs per multiply-add; layer norms, softmax, GELU, the loss are
bandwidth work and left out, as in the usual MFU convention):

* target encoder, forward only, over B sequences of N tokens;
* context encoder, forward + backward (3x forward), over nenc·B sequences of Kc tokens
  (its patch embedding runs over all N tokens of each image, before the gather, and
  needs no input gradient: 2x);
* predictor, forward + backward, over npred·nenc·B sequences of Kc + Kt tokens, plus
  its input embedding over the nenc·B context sequences and its output projection over
  the Kt positions kept.

A block over L tokens of width D (MLP hidden r·D) costs ``2·L·(4 + 2r)·D²`` in its
Linear layers and ``4·L²·D`` in attention (QKᵀ and AV). Backward is counted as twice the
forward (one product for the input gradient, one for the weight gradient); recomputation
by activation checkpointing or by a flash kernel's backward is not counted (it is the
implementation's overhead, not the model's work).

``measured_peak_flops(device, dtype)`` times a large matrix product on the device —
never a datasheet number — and MFU is achieved FLOP/s over that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepShape:
    """What one step's FLOPs depend on."""

    B: int  # images per step
    N: int  # patches per image
    patch_dim: int  # 3 · patch² (the patch conv's input width)
    D: int  # encoder width
    depth: int  # encoder blocks
    mlp_ratio: float  # encoder MLP hidden / D
    P: int  # predictor width
    pred_depth: int  # predictor blocks
    pred_mlp_ratio: float
    nenc: int  # context masks
    npred: int  # target masks
    Kc: int  # tokens per context mask
    Kt: int  # tokens per target mask


def block_flops(L: int, D: int, mlp_ratio: float) -> float:
    """Forward matmul FLOPs of one pre-norm block over one sequence of L tokens of width D."""
    linear = 2 * L * (4 * D * D + 2 * mlp_ratio * D * D)  # qkv (3D²) + proj (D²) + fc1, fc2 (r·D² each)
    attn = 2 * 2 * L * L * D  # q·kᵀ (L×L×D) and attn·v (L×L×D)
    return float(linear + attn)


def step_flops(s: StepShape) -> dict[str, float]:
    """FLOPs of one training step, by part; ``total`` is their sum."""
    patch = 2.0 * s.N * s.patch_dim * s.D  # the patch conv over all N tokens of one image
    target = s.B * (patch + s.depth * block_flops(s.N, s.D, s.mlp_ratio))
    # the patch conv's backward has a weight gradient only (the images need none): 2x, not 3x
    context = 2 * s.B * patch + 3 * s.nenc * s.B * s.depth * block_flops(s.Kc, s.D, s.mlp_ratio)
    L = s.Kc + s.Kt
    pred_seqs = s.npred * s.nenc * s.B
    predictor = 3 * (
        s.nenc * s.B * 2.0 * s.Kc * s.D * s.P  # predictor_embed
        + pred_seqs * s.pred_depth * block_flops(L, s.P, s.pred_mlp_ratio)
        + pred_seqs * 2.0 * s.Kt * s.P * s.D  # predictor_proj on the kept positions
    )
    return {
        "target_fwd": target,
        "context_fwd_bwd": context,
        "predictor_fwd_bwd": predictor,
        "total": target + context + predictor,
    }


def shape_of(model, B: int, masks_enc, masks_pred) -> StepShape:
    """The :class:`StepShape` of an ``IJEPA`` model for a batch with these masks."""
    enc, pred = model.encoder, model.predictor
    enc = getattr(enc, "module", enc)  # DDP
    pred = getattr(pred, "module", pred)
    conv = enc.patch_embed.proj
    blk, pblk = enc.blocks[0], pred.predictor_blocks[0]
    return StepShape(
        B=B,
        N=enc.patch_embed.num_patches,
        patch_dim=conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1],
        D=enc.embed_dim,
        depth=len(enc.blocks),
        mlp_ratio=blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
        P=pblk.mlp.fc1.in_features,
        pred_depth=len(pred.predictor_blocks),
        pred_mlp_ratio=pblk.mlp.fc1.out_features / pblk.mlp.fc1.in_features,
        nenc=len(masks_enc),
        npred=len(masks_pred),
        Kc=int(masks_enc[0].size(1)),
        Kt=int(masks_pred[0].size(1)),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_flops(
    device: torch.device | str, dtype: torch.dtype, n: int | None = None, seconds: float = 1.0, clock: str = "wall"
) -> dict:
    """FLOP/s of an n×n×n matrix product on ``device`` in ``dtype``: the median of timed runs
    after a warm-up, on random (not zero) operands, rotating among several operand sets so
    that no run finds its inputs in a cache from the one before.

    ``clock="cpu"`` (CPU, one thread) times with the process's CPU time, as the CPU
    train-step table does, so that other work on a shared machine does not lower the peak.
    """
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1536
    timer = time.process_time if clock == "cpu" else time.perf_counter
    sets = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)) for _ in range(3)]
    out = torch.empty(n, n, device=device, dtype=dtype)
    for a, b in sets:  # warm-up: library handles, kernel choice
        torch.mm(a, b, out=out)
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    i = 0
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 200):
        a, b = sets[i % len(sets)]
        i += 1
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = timer()
            torch.mm(a, b, out=out)
            times.append(timer() - t0)
    times.sort()
    median = times[len(times) // 2]
    return {"flops_per_s": 2.0 * n**3 / median, "n": n, "dtype": str(dtype).replace("torch.", ""), "runs": len(times), "median_s": median,
            "clock": clock, "threads": torch.get_num_threads()}  # fmt: skip


if __name__ == "__main__":
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for dt in (torch.float32, torch.bfloat16):
        r = measured_peak_flops(dev, dt)
        print(
            f"{dev.type} {r['dtype']:>8}: {r['flops_per_s'] / 1e12:8.3f} TFLOP/s ({r['n']}^3 matmul, median of {r['runs']}, "
            f"{r['threads']} thread(s), wall clock)"
        )
