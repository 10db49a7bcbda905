"""``python -m fastjepa.train [--config FILE] [--output DIR] [--resume [--trust-checkpoint] | --overwrite] [section.key=value ...]``

With no arguments: the packaged CPU config (a small ViT on the embedded MNIST-5k digits,
a few minutes on a laptop). Under ``torchrun`` it trains data-parallel (DDP, or FSDP2
with ``meta.fsdp=true``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .config import ConfigError, load_config, one_line, os_error_line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m fastjepa.train",
        description="I-JEPA pretraining. Config: YAML (the reference's files work unchanged) + section.key=value overrides.",
        epilog="example: python -m fastjepa.train --output runs/a optimization.epochs=1 data.batch_size=32",
    )
    p.add_argument("--config", help="YAML config (default: the packaged CPU config, fastjepa/configs/default.yaml)")
    p.add_argument("--output", help="output folder (default: logging.folder, else a fresh folder under runs/)")
    p.add_argument("--resume", action="store_true", help="continue from the output folder's latest checkpoint")
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="resume even from a checkpoint that needs more than a weights-only load (it can run code: only for files you trust)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start a fresh run in an --output folder that holds another run's checkpoints, deleting that run's "
        "checkpoints of the same logging.write_tag (without it such a folder is refused: --resume continues it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (also off when stderr is not a terminal)")
    p.add_argument("--trace-shapes", action="store_true", help="run one step, print the tensor shapes through it, and exit")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="an override (same as a positional one)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides, e.g. optimization.epochs=1")
    return p.parse_intermixed_args(argv)  # options may come between the overrides


def default_output(cfg: dict) -> Path:
    if cfg["logging"]["folder"]:
        return Path(cfg["logging"]["folder"])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path("runs") / f"{cfg['meta']['model_name']}-{stamp}"
    n = 1
    while out.exists():
        n += 1
        out = Path("runs") / f"{cfg['meta']['model_name']}-{stamp}-{n}"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = _plan_threads()
    try:
        cfg = load_config(args.config, [*args.overrides, *args.set])
    except ConfigError as exc:
        print(f"fastjepa.train: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.trace_shapes:
        from .trace import trace_shapes_from_config

        trace_shapes_from_config(cfg)
        return 0
    resume = args.resume or cfg["meta"]["load_checkpoint"]
    if args.output:
        out = Path(args.output)
    elif resume and cfg["logging"]["folder"]:
        out = Path(cfg["logging"]["folder"])
    elif resume:
        print("fastjepa.train: --resume needs --output DIR (the folder of the run to continue)", file=sys.stderr)
        return 2
    else:
        out = default_output(cfg)

    from .build import pick_device
    from .checkpoint import CheckpointError
    from .distributed import init_distributed
    from .training.trainer import Trainer
    from .training.checkpointing import NonFiniteLoss

    try:
        device = pick_device(cfg["meta"]["device"])
        if device.type == "cpu" and plan is not None:
            _apply_threads(plan)
        dist = init_distributed(device.type)
        trainer = Trainer(
            cfg, out, resume=resume, quiet=args.quiet, dist=dist, trust_checkpoint=args.trust_checkpoint, overwrite=args.overwrite
        )
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fastjepa.train: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: an unwritable or full disk, a folder that vanished
        print(f"fastjepa.train: {os_error_line(exc)}", file=sys.stderr)
        return 2
    try:
        summary = trainer.fit()
    except NonFiniteLoss as exc:
        print(f"fastjepa.train: {exc}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, ValueError) as exc:  # found once the run starts (wandb missing, a folder in use, no readable image)
        print(f"fastjepa.train: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastjepa.train: {os_error_line(exc)}; {_kept(trainer)}", file=sys.stderr)
        return 2
    finally:
        stop_signal = trainer.stopper.signal
        if dist.enabled:
            _shutdown_distributed(trainer)
            del trainer
    if summary["status"] == "interrupted":
        return 128 + (stop_signal or 15)
    if summary["status"] == "collapsed":
        if dist.is_main and cfg["logging"]["plots"]:
            from .plot import plot_run

            plot_run(out)
        if dist.is_main:
            print(f"fastjepa.train: stopped on collapse (meta.on_collapse=stop): {summary['collapse']}; "
                  f"checkpoint {summary['checkpoint']}" + (f", best {summary['best_checkpoint']}" if summary["best_checkpoint"] else ""),
                  file=sys.stderr, flush=True)  # fmt: skip
        return 4
    if not dist.is_main:
        return 0
    extras = _after_training(cfg, out, summary, args.quiet or not sys.stderr.isatty())
    print(
        f"fastjepa: {summary['status']}: {summary['epochs']} epoch(s), step {summary['step']}, {summary['images_seen']} images "
        f"in {summary['wall_time_s']:.1f} s, final loss {summary['final_loss']:.4f}{extras} — "
        f"files in {out}/ (checkpoint {Path(summary['checkpoint']).name}, log.csv, config.yaml, plots)",
        flush=True,
    )
    if extras:
        print(PROBE_MEANING, flush=True)
    return 0


def _plan_threads():
    """Threads and OpenMP's wait policy from the busy cores, measured before torch loads
    OpenMP (fastjepa.training.cpu); None where the user set OMP_NUM_THREADS or under
    torchrun (ranks starting beside each other would look busy). Where torch is already
    loaded (an in-process call) only the thread count still applies: the environment is
    left as it is."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) != 1:
        return None
    from .training.cpu import plan_threads

    plan = plan_threads(dict(os.environ) if "torch" in sys.modules else None)
    return plan if plan.threads is not None else None


def _apply_threads(plan) -> None:
    """One torch thread per core other processes leave free."""
    import torch

    from .data import cores_per_process

    cores = min(torch.get_num_threads(), cores_per_process())
    n = min(plan.threads, cores)
    if n < torch.get_num_threads():
        torch.set_num_threads(n)
        print(f"fastjepa: other processes keep {cores - n} of this process's {cores} cores busy: training with {n} thread(s) "
              "(set OMP_NUM_THREADS to choose)", file=sys.stderr, flush=True)  # fmt: skip


def _kept(trainer) -> str:
    latest = getattr(trainer, "latest", None)
    if latest is not None and latest.exists():
        return f"the last complete checkpoint is {latest} (continue with --resume once the cause is fixed)"
    return "no checkpoint was written"


# What the quick probe can and cannot show, said once under its numbers (the evidence is
# in docs/probe-experiments.md).
PROBE_MEANING = (
    "fastjepa: what the probe means: at this scale I-JEPA is not expected to beat its random initialisation; "
    "this run checks the machinery, the published recipe needs ImageNet and ~300 epochs (docs/probe-experiments.md)"
)


def _shutdown_distributed(trainer) -> None:
    """Free the DDP/FSDP modules, then the process group. Left to interpreter exit, the
    DDP reducer's destructor holds the GIL while gloo's worker thread waits for it to
    release the last collective's tensors: a deadlock at exit (seen with gloo)."""
    import gc

    import torch.distributed

    trainer.model = trainer.optimizer = None
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _after_training(cfg: dict, out: Path, summary: dict, quiet: bool) -> str:
    """On the embedded data, the quick probe (first, so the plots can show it); then the
    plots. Returns text for the summary line."""
    text = ""
    if cfg["logging"]["probe"] and cfg["data"]["dataset"] == "embedded" and summary["status"] == "done":
        from .evaluation.probe import quick_probe

        res = quick_probe(out, cfg, quiet=quiet)
        base = res["random_init"]
        best = res.get("best")
        kept = (
            f"; best-RankMe checkpoint (epoch {best['epoch']}) {100 * best['linear_probe_top1']:.1f}% / {100 * best['knn_top1']:.1f}%"
            if best
            else ""
        )
        text = (
            f", linear probe {100 * res['linear_probe_top1']:.1f}% / k-NN {100 * res['knn_top1']:.1f}%{kept} "
            f"(random init {100 * base['linear_probe_top1']:.1f}% / {100 * base['knn_top1']:.1f}%)"
        )
    if cfg["logging"]["plots"]:
        from .plot import plot_run

        plot_run(out)
    return text


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
