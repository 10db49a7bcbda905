"""torchrun on CPU (gloo): DDP and FSDP2 equal a single process over the same global batch."""

import csv
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastjepa.build import build_model
from fastjepa.checkpoint import load_encoder, read_checkpoint
from fastjepa.config import load_config
from fastjepa.rng import seed_everything
from fastjepa.training.trainer import Trainer

from .._inject import nan_at_script
from .._tiny import TINY

ROOT = Path(__file__).resolve().parents[2]


def torchrun(out, *overrides, nproc=2, timeout=240, env=None, program=("-m", "fastjepa.train")):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *program, "--quiet", "--output", str(out), *TINY, "data.synthetic_samples=64", *overrides]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def losses(run_dir):
    with open(Path(run_dir) / "log.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def single(out, *overrides):
    cfg = load_config(None, [*TINY, "data.synthetic_samples=64", "data.batch_size=16", *overrides])
    return Trainer(cfg, out, quiet=True).fit()


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accum", "fsdp-accum"])
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path, mode):
    """-accum: 2 micro-batches of 4 per rank (DDP's no_sync / FSDP2's deferred reduce)."""
    extra = ["meta.fsdp=true"] if mode.startswith("fsdp") else []
    extra += ["optimization.grad_accum=2"] if mode.endswith("accum") else []
    r = torchrun(tmp_path / mode, *extra)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    if mode.startswith("ddp"):
        assert "parameters identical across 2 ranks" in r.stderr
    assert "effective 16" in r.stderr  # batch 8 per process × 2
    single(tmp_path / "single")
    a, b = losses(tmp_path / mode), losses(tmp_path / "single")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(8))
    for (_, x), (_, y) in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-7)
    # the rank-0 checkpoint holds full (unsharded) weights in the reference format, and they
    # are the single process's: encoder, predictor and the EMA target (a broken or skipped EMA
    # of the shards would leave the target at its init)
    load_encoder(tmp_path / mode / "jepa-latest.pth.tar", build_model(load_config(None, TINY)).encoder)  # strict, reference names
    got, want = read_checkpoint(tmp_path / mode / "jepa-latest.pth.tar"), read_checkpoint(tmp_path / "single" / "jepa-latest.pth.tar")
    seed_everything(load_config(None, TINY)["meta"]["seed"])  # the runs' own step-0 weights, as Trainer builds them
    init = build_model(load_config(None, TINY)).state_dict()
    for net in ("encoder", "predictor", "target_encoder"):
        assert got[net].keys() == want[net].keys()
        for k in want[net]:
            torch.testing.assert_close(got[net][k], want[net][k], rtol=1e-4, atol=2e-6, msg=f"{mode} {net}.{k}")
    moved = max((want["target_encoder"][k] - init[f"target_encoder.{k}"]).abs().max().item() for k in want["target_encoder"])
    assert moved > 1e-5  # (measured 3.7e-5) the comparison above can tell an updated target from one left at init


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_under_torchrun_continues_exactly(tmp_path, mode):
    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / "full", *extra)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("fastjepa: vit_tiny on cpu (2 process(es))") == 1  # rank 0 alone speaks (and writes)
    r = torchrun(tmp_path / "part", *extra, "meta.max_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(tmp_path / "part", *extra, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


@pytest.mark.parametrize("device_type, backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_process_group_backend_follows_the_device(monkeypatch, device_type, backend):
    """CUDA: cuda:LOCAL_RANK is made current and the NCCL group is bound to it (rank 3 of 4,
    second process on its node: cuda:1 of two visible GPUs)."""
    from fastjepa import distributed

    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda d: seen.setdefault("cuda_device", d))
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = distributed.init_distributed(device_type)
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1) and seen["backend"] == backend
    want = torch.device("cuda", 1) if device_type == "cuda" else None
    assert seen.get("cuda_device") == want and seen.get("device_id") == want


def test_rank_device_is_cuda_local_rank():
    from fastjepa.distributed import ddp_device_kwargs, rank_device

    assert rank_device("cuda", 3, 8) == torch.device("cuda", 3)
    assert rank_device("cuda") == torch.device("cuda", 0)  # one process: cuda:0
    assert rank_device("cpu", 5, None) == torch.device("cpu")
    assert ddp_device_kwargs(torch.device("cuda", 3)) == {"device_ids": [3], "output_device": 3}
    assert ddp_device_kwargs(torch.device("cpu")) == {}
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2, but this process sees 2 CUDA device\(s\).*--nproc_per_node=2"):
        rank_device("cuda", 2, 2)
    with pytest.raises(ValueError, match=r"cuda has no index; expected cuda:N"):
        ddp_device_kwargs(torch.device("cuda"))


class _Recorder:
    """torch.cuda answering as a two-GPU node, a stand-in DDP and a model whose ``.to``
    records its device: what a two-rank CUDA launch would do, on a CPU build."""

    def __init__(self, monkeypatch):
        import torch.nn.parallel

        from fastjepa import fsdp
        from fastjepa.training import trainer

        self.calls = []
        calls = self.calls
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", torch.device(d))))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: calls.append(("max_memory_allocated", d)) or 2**30)

        class StandInDDP(torch.nn.Module):
            def __init__(self, module, **kwargs):
                super().__init__()
                self.module = module
                calls.append(("DDP", kwargs))

        monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", StandInDDP)
        monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 2)
        monkeypatch.setattr(fsdp, "init_device_mesh", lambda kind, shape: calls.append(("mesh", kind, shape)) or "mesh")
        monkeypatch.setattr(fsdp, "fully_shard", lambda module, mesh: calls.append(("fully_shard", mesh)))
        build = trainer.build_model

        def build_recording(cfg):
            model = build(cfg)
            model.to = lambda device: calls.append(("model.to", torch.device(device))) or model
            return model

        monkeypatch.setattr(trainer, "build_model", build_recording)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_two_rank_cuda_launch_puts_rank_1_on_cuda_1_everywhere(tmp_path, monkeypatch, mode):
    """Rank 1 of a two-GPU torchrun (simulated): its device is cuda:1 for the model, the
    current device, DDP's device_ids and output_device (both networks), the FSDP2 mesh
    (made after cuda:1 is current), the batches and the memory statistics."""
    from fastjepa.distributed import DistInfo

    rec = _Recorder(monkeypatch)
    cfg = load_config(None, [*TINY, "meta.device=cuda", f"meta.fsdp={str(mode == 'fsdp').lower()}"])
    t = Trainer(cfg, tmp_path, quiet=True, dist=DistInfo(rank=1, world_size=2, local_rank=1))
    cuda1 = torch.device("cuda", 1)
    assert t.device == cuda1
    assert ("model.to", cuda1) in rec.calls and ("set_device", cuda1) in rec.calls
    assert all(c[1] == cuda1 for c in rec.calls if c[0] in ("model.to", "set_device")), rec.calls
    if mode == "ddp":
        assert [c for c in rec.calls if c[0] == "DDP"] == [("DDP", {"device_ids": [1], "output_device": 1})] * 2
    else:
        mesh = rec.calls.index(("mesh", "cuda", (2,)))
        assert ("set_device", cuda1) in rec.calls[:mesh] and not any(c[0] == "DDP" for c in rec.calls)
        assert sum(c == ("fully_shard", "mesh") for c in rec.calls) == 3 * (1 + 1)  # 3 networks × (1 block + root)
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: moved.append(torch.device(a[0])) or real_to(self, "cpu"))
    imgs, masks_enc, masks_pred = t.stepper.to_device(*t.collator([t.dataset[i] for i in range(8)]))
    monkeypatch.setattr(torch.Tensor, "to", real_to)
    assert moved == [cuda1] * (1 + len(masks_enc) + len(masks_pred))
    assert t.log.mem_gb() == 1.0 and rec.calls[-1] == ("max_memory_allocated", cuda1)


def test_fsdp_resume_of_another_architecture_is_one_clear_error(tmp_path):
    r = torchrun(tmp_path / "run", "meta.fsdp=true", "meta.max_steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = torchrun(tmp_path / "run", "meta.fsdp=true", "--resume", "meta.model_kwargs={depth: 2, embed_dim: 32, num_heads: 2}")
    assert r.returncode != 0
    assert "architecture differs" in r.stderr and "depth 2 here, 1 in the checkpoint" in r.stderr, r.stderr[-3000:]
    assert "jepa-latest.pth.tar" in r.stderr, r.stderr[-3000:]
    assert not re.search(r'File ".*fastjepa[/\\]', r.stderr), r.stderr[-3000:]  # the ranks print no traceback (torchrun may)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nan_on_one_rank_stops_every_rank_together(tmp_path, mode):
    """A NaN loss on rank 1 only: both ranks stop at the same check, naming the step, and
    the epoch-1 checkpoint stays (no hang in a collective the other rank never joins)."""
    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / "run", *extra, "optimization.epochs=3", program=nan_at_script(tmp_path, rank=1, step=6), timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("the loss became non-finite at step 6 (epoch 2, iteration 2)") == 2, r.stderr[-3000:]  # both ranks
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["encoder"].values())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_nan_skip_on_one_rank_skips_on_every_rank(tmp_path, mode):
    """nan_policy=skip, a NaN loss on rank 1 only: every rank skips that update (the
    all-reduce spread the NaN gradients to all), so the run ends finite and in sync."""
    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / "run", *extra, "optimization.nan_policy=skip", program=nan_at_script(tmp_path, rank=1, step=2), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: non-finite loss or gradients" in r.stderr
    assert ("parameters identical across 2 ranks" if mode == "ddp" else "FSDP2 run finished on 2 ranks") in r.stderr
    ckpt = read_checkpoint(tmp_path / "run" / "jepa-latest.pth.tar")
    assert all(torch.isfinite(v).all() for k in ("encoder", "predictor", "target_encoder") for v in ckpt[k].values())


def _worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc), if it is up yet."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_sigterm_to_one_rank_stops_every_rank_with_a_checkpoint(tmp_path):
    """Only rank 1 gets SIGTERM (a preempted node): both ranks stop at the same step, rank 0
    writes the checkpoint and says why, and --resume continues the run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = tmp_path / "run"
    args = [*TINY, "data.synthetic_samples=64", "optimization.epochs=40", "meta.max_steps=200"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fastjepa.train", "--quiet", "--output", str(run), *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run / "log.csv").exists() and len(losses(run)) >= 3:
            break
        time.sleep(0.2)
    pid = _worker_pid(proc.pid, 1)
    assert pid is not None and proc.poll() is None
    os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "ValueError" not in err, err[-3000:]
    assert re.search(r"stopped by a signal to another rank at step (\d+)", err), err[-3000:]
    ckpt = read_checkpoint(run / "jepa-latest.pth.tar")
    assert 0 < ckpt["fastjepa"]["step"] < 160
    r = torchrun(run, "optimization.epochs=40", "meta.max_steps=200", "--resume", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [s for s, _ in losses(run)] == list(range(160))  # 40 epochs of 4 global batches, each step once


# -- two processes on two GPUs over NCCL


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason=f"needs two CUDA GPUs (one process on each, over NCCL); this machine has {_gpus()}")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_on_two_gpus_over_nccl(tmp_path, mode):
    """torchrun --nproc_per_node=2 with meta.device=cuda: rank r trains on cuda:r (two ranks
    on one GPU would stop NCCL with 'Duplicate GPU detected'); the run finishes with finite
    losses and, under DDP, identical weights on both ranks."""
    extra = ["meta.fsdp=true"] if mode == "fsdp" else []
    r = torchrun(tmp_path / mode, "meta.device=cuda", "meta.use_bfloat16=true", *extra, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "vit_tiny on cuda:0 (2 process(es))" in r.stderr, r.stderr[-3000:]
    assert ("parameters identical across 2 ranks" if mode == "ddp" else "FSDP2 run finished on 2 ranks") in r.stderr
    rows = losses(tmp_path / mode)
    assert len(rows) == 8 and all(math.isfinite(v) for _, v in rows)
