"""``python -m fastjepa.info``: what runs here, and why something does not.

Prints one table row per component (torch, CUDA, Triton and its interpreter, the
fastjepa._C extension with its build information, flash-attn, xformers, the attention
backends) and the backend ``auto`` picks for CPU and CUDA tensors.
"""

from __future__ import annotations

import importlib
import platform

import torch

from .ops import attention_available, available, cpp_has_cuda, cpp_torch_mismatch, cpu_has_bf16, triton_interpret
from .ops.linear_gelu import onednn_op


def rows() -> list[tuple[str, bool, str]]:
    """(component, available, version / build info or the reason it is not)."""
    out = [("python", True, platform.python_version()), ("torch", True, torch.__version__)]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        out.append(("cuda", True, f"CUDA {torch.version.cuda}: {names}"))
    elif torch.version.cuda is None:
        out.append(("cuda", False, "this torch is a CPU build"))
    else:
        out.append(("cuda", False, f"torch built with CUDA {torch.version.cuda}, but no device is visible"))
    avail = available()
    out.append(("triton", avail["triton"].ok, avail["triton"].reason))
    out.append(("triton interpreter", triton_interpret(), "TRITON_INTERPRET=1" if triton_interpret() else "TRITON_INTERPRET is not 1"))
    cpp = avail["cpp"]
    if cpp:
        module = importlib.import_module("fastjepa._C")
        text = ", ".join(f"{k} {v}" for k, v in module.build_info().items())
        problem = cpp_torch_mismatch(module)
        out.append(("fastjepa._C", True, f"{text}; WARNING: {problem}" if problem else f"{text} (built for the running torch)"))
        out.append(("fastjepa._C CUDA kernels", cpp_has_cuda(), "built" if cpp_has_cuda() else "built without CUDA"))
    else:
        out.append(("fastjepa._C", False, cpp.reason))
    attn = attention_available()
    out.append(("flash-attn", attn["flash"].ok, attn["flash"].reason))
    out.append(("xformers", attn["xformers"].ok, attn["xformers"].reason))
    out.append(("attention sdpa", attn["sdpa"].ok, attn["sdpa"].reason))
    bf16 = cpu_has_bf16()
    out.append(("cpu bf16 matmul", bf16, "oneDNN bf16 (avx512_bf16 / AMX): meta.use_bfloat16 autocasts the CPU step to bf16" if bf16
                else "no bf16 matrix instructions: the CPU step runs fp32"))  # fmt: skip
    fused = onednn_op() is not None
    out.append(("cpu fused linear+GELU", fused, "mkldnn._linear_pointwise: the target encoder's fc1 + GELU in one kernel" if fused
                else "this torch has no mkldnn._linear_pointwise: fc1 and GELU run eagerly"))  # fmt: skip
    backend = [ln.split(":", 1)[1].strip() for ln in torch.__config__.parallel_info().splitlines() if "parallel backend" in ln]
    out.append(("cpu threads", True, f"{torch.get_num_threads()} ({backend[0] if backend else 'unknown'} backend)"))
    return out


def table() -> str:
    data = rows()
    width = max(len(name) for name, _, _ in data)
    lines = [f"{'component':<{width}}  ok   info / reason", f"{'-' * width}  ---  {'-' * 40}"]
    lines += [f"{name:<{width}}  {'yes' if ok else 'no ':<3}  {why}" for name, ok, why in data]
    return "\n".join(lines)


def main() -> None:
    print(table())


if __name__ == "__main__":
    main()
