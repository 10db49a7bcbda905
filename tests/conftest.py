"""Test setup: Triton kernels run through the interpreter on the CPU.

``TRITON_INTERPRET=1`` must be set before triton is imported anywhere, so it is set
here, at collection time. GPU-only tests carry ``@pytest.mark.gpu`` and are skipped
when no CUDA device is present (never a collection error), and on a GPU unless
``TRITON_INTERPRET=0`` (so that they test compiled kernels, not the interpreter).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# `python -m fastjepa.train` in a subprocess trains with one thread per core other processes
# leave free (fastjepa.training.cpu); the tests compare its losses bit for bit with runs in
# this process, which needs the same thread count whatever the machine's load
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def triton_skip_reason(availability) -> str | None:
    """Why the ``triton``-marked tests cannot run, given ``fastjepa.ops.available()["triton"]``,
    or None. Such a Triton (Triton < 3.7 with NumPy >= 2.4: a CUDA torch's pin) still runs
    compiled kernels on a GPU; only its CPU interpreter is broken."""
    if availability:
        return None
    return f"Triton kernels cannot run here: {availability.reason}"


def pytest_collection_modifyitems(config, items):
    if any("triton" in item.keywords for item in items):
        from fastjepa.ops._dispatch import _triton_available

        why = triton_skip_reason(_triton_available())
        if why is not None:
            skip_triton = pytest.mark.skip(reason=why)
            for item in items:
                if "triton" in item.keywords:
                    item.add_marker(skip_triton)
    if not torch.cuda.is_available():
        reason = "needs a CUDA GPU"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        # the interpreter would run the Triton kernels of the GPU tests too, so they would
        # pass without testing compiled code; benchmarks/gpu_check.sh sets TRITON_INTERPRET=0
        reason = "TRITON_INTERPRET=1 (the CPU tests' default): run `TRITON_INTERPRET=0 pytest -m gpu` for compiled kernels"
    else:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_free_rng(request):
    """Fresh random inputs each run (no fixed seed); the seed is printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.fastjepa_seed = seed
    yield seed


def add_seed_section(item, report) -> None:
    """A failed test's report gets a section naming the seed that reproduces its inputs."""
    seed = getattr(item, "fastjepa_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"this test's inputs came from torch.manual_seed({seed})"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    add_seed_section(item, outcome.get_result())


@pytest.fixture
def poison_empty(monkeypatch):
    """Every float ``torch.empty`` / ``torch.empty_like`` in the test comes back NaN-filled,
    so an output or gradient element a kernel forgets to write fails the comparison."""
    for name in ("empty", "empty_like"):
        real = getattr(torch, name)

        def nan_filled(*args, _real=real, **kwargs):
            t = _real(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, name, nan_filled)
