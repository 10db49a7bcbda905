"""Compile every Triton kernel ahead of time for sm_80 and sm_90, no GPU needed (a script).

    python tests/kernels/_aot_compile.py           # one JSON line per compiled kernel, then DONE

Run by ``tests/kernels/test_compile.py`` in a subprocess without ``TRITON_INTERPRET``; it
works with any Triton whose ahead-of-time API matches 3.6 - 3.9, and its own torch.

Each kernel is compiled with the tile sizes and ``num_warps`` its launcher picks on a GPU
(``fastjepa.kernels._tiles``) and with the specialisation Triton's JIT gives a typical
call (ViT-B/16 and ViT-H/14 at 224 px, contiguous tensors): pointers 16-byte aligned,
integer arguments divisible by 16 marked so, integer arguments equal to 1 made constants,
except the per-batch lengths a kernel marks ``do_not_specialize`` (plain i32).
For each it reports the registers, the spill bytes (``ptxas -v`` on the PTX) and the
width in bits of every global load and store in the PTX.

Exit status: 0 with ``DONE`` when everything compiled; 3 with a ``SKIP`` line when this
Triton is outside the versions whose API the script is written for; 1 on any error
(a Triton inside those versions whose API does not fit is an error, not a skip).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SUPPORTED = ((3, 6), (3, 9))  # oldest and newest Triton whose ahead-of-time API this script knows
ARCHS = (80, 90)  # A100; H100 / H200
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def version_tuple(v: str) -> tuple[int, int]:
    major, minor = v.split(".")[:2]
    return int(major), int(re.match(r"\d+", minor).group())


# -- the kernels, their typical calls -----------------------------------------------------

# published shapes at 224 px: (B, N, D) of the encoder, K context tokens / Kt target tokens
MODELS = {
    "vitb16": dict(B=128, N=196, D=768, Kc=50, Kt=30),
    "vith14": dict(B=128, N=256, D=1280, Kc=70, Kt=44),
}
P, NENC, NPRED = 384, 1, 4  # predictor width, masks


def cases(k, dt: str, it: str, m: dict):
    """(kernel, pointer types, scalar values, float scalars, constexprs, num_warps, checks) of each kernel
    at model shape ``m``, data dtype ``dt``, index dtype ``it``. ``checks``: what the width test expects
    of the bf16 compile — ``loads``: data tensors whose loads must be >= 64 bits wide, ``stores``:
    whether every plain global store must be >= 64 bits wide, ``narrow``: whether any access under 32
    bits is a failure (the bf16 row copies)."""
    g, p, t, s = (k(name) for name in ("gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"))
    tiles = k("_tiles")
    B, N, D, Kc, Kt = m["B"], m["N"], m["D"], m["Kc"], m["Kt"]
    x, i = "*" + dt, "*" + it
    rows = NENC * B * Kc
    fw = tiles.row_tiles(rows, D, gpu=True)
    bw = tiles.row_tiles(B * N, D, gpu=True)
    yield (g._gather_tokens_fwd_kernel, dict(X=x, POS=x, IDX=i, OUT=x),
           dict(B=B, N=N, K=Kc, D=D, ROWS=rows, sxb=N * D, sxn=D, sxd=1, spn=D, spd=1), {},
           dict(HAS_POS=True, SLOT_MAJOR=False, BLOCK_R=fw.block_r, BLOCK_D=fw.block_d), fw.num_warps,
           dict(loads=2, stores=True, narrow=True))
    # training's layout: the patch embedding's transposed view, strides (N·D, 1, N); x is read
    # one element per thread along the slots (narrow by design), pos and the store stay wide
    sm = tiles.slot_major_tiles(rows, D, gpu=True)
    yield (g._gather_tokens_fwd_kernel, dict(X=x, POS=x, IDX=i, OUT=x),
           dict(B=B, N=N, K=Kc, D=D, ROWS=rows, sxb=N * D, sxn=1, sxd=N, spn=D, spd=1), {},
           dict(HAS_POS=True, SLOT_MAJOR=True, BLOCK_R=sm.block_r, BLOCK_D=sm.block_d), sm.num_warps,
           dict(loads=1, stores=True, narrow=False))
    yield (g._gather_tokens_bwd_kernel, dict(GRAD=x, PERM="*i64", BOUNDS="*i64", GX=x, GPOS="*fp32"),
           dict(B=B, N=N, K=Kc, D=D, MK=NENC * Kc, ROWS=B * N), {},
           dict(POS_GRAD=True, BLOCK_R=bw.block_r, BLOCK_D=bw.block_d), bw.num_warps, dict(loads=1, stores=True, narrow=True))
    L, R = Kc + Kt, NPRED * NENC * B
    pf, pc, pm = p.token_tiles(P, L, gpu=True), p.token_tiles(P, Kc, gpu=True), p.token_tiles(P, Kt, mask_grad=True, gpu=True)
    yield (p._predictor_tokens_fwd_kernel, dict(CTX=x, IDX_X=i, IDX=i, POS=x, MT=x, OUT=x),
           dict(B=B, NENC=NENC, KC=Kc, KT=Kt, P=P, NPOS=N, scb=Kc * P, sck=P, scp=1, spn=P, spp=1), {},
           dict(BLOCK_T=pf.block_r, BLOCK_P=pf.block_d), pf.num_warps, dict(loads=2, stores=True, narrow=True))
    yield (p._predictor_tokens_bwd_ctx_kernel, dict(GRAD=x, IDX_X=i, GCTX=x, GPOS="*fp32"),
           dict(B=B, NENC=NENC, NPRED=NPRED, KC=Kc, KT=Kt, P=P, NPOS=N), {},
           dict(POS_GRAD=True, BLOCK_T=pc.block_r, BLOCK_P=pc.block_d), pc.num_warps, dict(loads=1, stores=True, narrow=True))
    yield (p._predictor_tokens_bwd_mask_kernel, dict(GRAD=x, IDX=i, PART="*fp32", GPOS="*fp32"),
           dict(B=B, NENC=NENC, KC=Kc, KT=Kt, P=P, NPOS=N, R=R, SEQ_PER_PROG=max(1, min(8, R // 2048))), {},
           dict(POS_GRAD=True, BLOCK_T=pm.block_r, BLOCK_P=pm.block_d), pm.num_warps, dict(loads=1, stores=False, narrow=True))
    trows = NPRED * B * Kt
    tt = tiles.whole_row_tiles(trows, D, gpu=True)
    yield (t._target_tokens_kernel, dict(H=x, IDX=i, OUT=x),
           dict(B=B, N=N, KT=Kt, D=D, NENC=NENC, ROWS=trows, shb=N * D, shn=D, shd=1), {"eps": 1e-5},
           dict(BLOCK_R=tt.block_r, BLOCK_D=tt.block_d), tt.num_warps, dict(loads=1, stores=True, narrow=True))
    n = R * Kt * D
    yield (s._smooth_l1_fwd_kernel, dict(Z=x, H=x, PART="*fp32"), dict(n=n), {"inv_n": 1.0 / n},
           dict(BLOCK=s.BLOCK), s.NUM_WARPS, dict(loads=2, stores=False, narrow=False))
    yield (s._smooth_l1_bwd_kernel, dict(Z=x, H=x, G=x, GZ=x, GH=x), dict(n=n), {"inv_n": 1.0 / n},
           dict(H_GRAD=True, BLOCK=s.BLOCK), s.NUM_WARPS, dict(loads=2, stores=True, narrow=False))


def dynamic_args(fn) -> tuple[str, ...]:
    """The arguments the kernel's ``@jit`` leaves unspecialised (``do_not_specialize``)."""
    return tuple(fn.arg_names[a] if isinstance(a, int) else a for a in (getattr(fn, "do_not_specialize", None) or []))


def source(ASTSource, fn, ptrs: dict, ints: dict, floats: dict, consts: dict):
    """An ASTSource specialised as the JIT specialises a call with these values (the
    ``do_not_specialize`` arguments as plain i32)."""
    sig, constexprs, attrs = {}, dict(consts), {}
    divisible = [["tt.divisibility", 16]]
    dynamic = set(dynamic_args(fn))  # do_not_specialize: a plain i32, whatever the value
    for pos, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(pos,)] = divisible  # torch allocations are 16-byte aligned
        elif name in floats:
            sig[name] = "fp32"
        elif name in dynamic:
            sig[name] = "i32"
        else:
            v = ints[name]
            if v == 1:
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(pos,)] = divisible
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s")


def access_widths(ptx: str) -> dict[str, dict[int, int]]:
    """{"ld": {bits: count}, "st": {bits: count}} over the plain global loads and stores."""
    out: dict[str, dict[int, int]] = {"ld": {}, "st": {}}
    for line in ptx.splitlines():
        mt = ACCESS.match(line)
        if not mt:
            continue
        parts = mt.group(2).strip(".").split(".")
        vec = next((int(q[1:]) for q in parts if re.fullmatch(r"v\d+", q)), 1)
        ty = next((q for q in reversed(parts) if re.fullmatch(r"[bufs]\d+", q)), None)
        if ty is None:
            raise RuntimeError(f"unparsed global access in the PTX: {line.strip()!r}")
        bits = vec * int(ty[1:])
        out[mt.group(1)][bits] = out[mt.group(1)].get(bits, 0) + 1
    return out


LAYOUT = re.compile(r"^(#\w+) = #ttg\.blocked<\{(.*)\}>", re.M)
LOAD = re.compile(r"tt\.load .*: tensor<(\d+(?:x\d+)*)x!tt\.ptr<\w+>, (#\w+)>")


def load_orders(ttgir: str) -> list[dict]:
    """Shape and thread layout of every 2-D global load in the TTGIR: ``threads`` (threads
    per warp along each axis) and ``order`` (the fastest axis first)."""
    layouts = {}
    for name, body in LAYOUT.findall(ttgir):
        fields = dict(re.findall(r"(\w+) = \[([\d, ]*)\]", body))
        layouts[name] = {k: [int(v) for v in fields[k].split(",")] for k in ("threadsPerWarp", "order") if k in fields}
    out = []
    for shape, layout in LOAD.findall(ttgir):
        dims = [int(v) for v in shape.split("x")]
        if len(dims) == 2 and layout in layouts:
            out.append({"shape": dims, "threads": layouts[layout].get("threadsPerWarp"), "order": layouts[layout].get("order")})
    return out


def ptxas_report(ptxas: str, ptx: str) -> dict[str, int]:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX (for its own .target)."""
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", "-o", os.path.join(tmp, "k.cubin"), src],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    log = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"ptxas -arch={arch} failed ({r.returncode}): {log[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"ptxas -v printed no register/spill report: {log[-2000:]}")
    return {"ptx_target": arch, "regs": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def main() -> int:
    import triton

    version = triton.__version__
    if not (SUPPORTED[0] <= version_tuple(version) <= SUPPORTED[1]):
        print(f"SKIP Triton {version} is outside {SUPPORTED[0]}..{SUPPORTED[1]}, the versions this script's "
              "ahead-of-time API calls are written for", flush=True)  # fmt: skip
        return 3
    # inside the supported range every failure below is an error
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    from fastjepa.ops._dispatch import kernels

    kernels()
    k = lambda name: importlib.import_module("fastjepa.kernels." + name)
    variants = [("vitb16", "fp32", "i64"), ("vitb16", "bf16", "i32"), ("vitb16", "fp16", "i64"), ("vith14", "bf16", "i32")]
    for arch in ARCHS:
        target = GPUTarget("cuda", arch, 32)
        ptxas = get_ptxas(arch).path
        for model, dt, it in variants:
            for fn, ptrs, ints, floats, consts, num_warps, checks in cases(k, dt, it, MODELS[model]):
                if model != "vitb16" and "D" not in ints:
                    continue  # only the D-dependent kernels change with the model width
                compiled = triton.compile(source(ASTSource, fn, ptrs, ints, floats, consts), target=target,
                                          options={"num_warps": num_warps})  # fmt: skip
                ptx = compiled.asm["ptx"]
                row = {"kernel": fn.__name__, "arch": arch, "model": model, "dtype": dt, "idx": it, "num_warps": num_warps,
                       "consts": {n: v for n, v in consts.items()}, "checks": checks,
                       **ptxas_report(ptxas, ptx), "access_bits": access_widths(ptx),
                       "load_orders": load_orders(compiled.asm["ttgir"])}  # fmt: skip
                print(json.dumps(row), flush=True)
    print(f"DONE triton {version}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
