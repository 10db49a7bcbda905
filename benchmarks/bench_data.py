"""The imagefolder pipeline: images/s per loader core, fastjepa vs the reference pipeline.

    python benchmarks/bench_data.py [--quick] [--crop 224] [--files 48] [--out benchmarks/results]

Writes ImageNet-like JPEGs first (quality 90; natural-image-like content with a 1/f
amplitude spectrum and correlated colours, so the files are ~80 KB at 500×375 as ImageNet's
are): set ``500x375`` (ImageNet's typical size, half of them portrait: the target's
measurement) and set ``imagenet-mix`` (the same with every 8th file 1024×768, for a mean
file size near ImageNet's ~110 KB); ``--large`` adds a set of 1600×1200 sources. Then, in
one run:

* per core: each pipeline in this process with one torch thread, timed by its own CPU
  time (``time.process_time``) so other jobs on a shared machine move the numbers less;
  the pipelines alternate over several rounds and the median round counts. The ratio is
  taken within the run.
* all cores: one process per core, each running the pipeline for a fixed wall time.

Pipelines (all from the same files, crop ``--crop`` with the training crop scale):
``reference`` (what the reference I-JEPA's torchvision transforms do: full Pillow decode,
RandomResizedCrop resizing straight from the box, to-tensor, normalise, all on the CPU);
``fastjepa`` (the dataset exactly as training builds it, ``build_dataset(cfg["data"], device)``:
header-only box sampling, reduced-DCT decode, uint8 crop — the float conversion and
normalisation run on the training device, so the loader core does not pay for them);
``fastjepa-float`` (``ImageFolder`` with its defaults, ``output="float"``: the same crops
normalised on the CPU, as a user calling the class directly gets them — not what training
runs); ``reference-imagefolder`` (fastjepa's own reference mode, ``data.fast_decode=false``);
``fastjepa-pillow`` (the fast path without simplejpeg); ``uint8-only`` (the reference decode,
uint8 out); ``gpu-worker`` (what a worker does for ``data.decode=gpu``: read the file, check
the header, sample the box). The ratio that matters for a training run is fastjepa over
reference; fastjepa-float over reference is the number a direct ``ImageFolder`` user sees.
Before timing, the fast path's crops are checked against the reference decode's (PSNR).
Also printed: how many cores per GPU a step rate (images/s per GPU) needs.
The report is rewritten after every phase, so a run cut short keeps what it finished; with
``--gpu``, the images nvjpeg refused (decoded on the CPU instead) are counted and reported.
Writes ``cpu-<date>-data.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

if importlib.util.find_spec("fastjepa") is None:  # a source checkout run as `python benchmarks/...`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _report import cpu_name, write_report  # noqa: E402

from fastjepa.data import ImageFolder, build_dataset  # noqa: E402
from fastjepa.data import decode as fast  # noqa: E402
from fastjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, sample_crop_box  # noqa: E402


def natural_image(height: int, width: int, rng: np.random.Generator, alpha: float = 1.22) -> np.ndarray:
    """(height, width, 3) uint8 with a natural image's statistics: amplitude spectrum ~1/f^alpha
    (random phases), colour channels correlated. alpha 1.22 gives ~80 KB JPEGs at 500×375, q90."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    chans = []
    for _ in range(3):
        spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f**alpha
        spec[0, 0] = 0
        chans.append(np.fft.irfft2(spec, s=(height, width)))
    x = np.stack(chans, -1) @ (rng.standard_normal((3, 3)) * 0.3 + np.eye(3))
    x = (x - x.mean()) / x.std()
    return np.clip(128 + 45 * x, 0, 255).astype(np.uint8)


def write_jpegs(folder: Path, n: int, seed: int = 0, large: tuple[int, int] = (768, 1024), large_every: int = 8) -> list[Path]:
    """``n`` JPEGs (q90) under ``folder/c0``: 500×375 / 375×500, every ``large_every``-th (0: none) ``large``."""
    rng = np.random.default_rng(seed)
    (folder / "c0").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = large if large_every and i % large_every == large_every - 1 else ((375, 500) if i % 2 == 0 else (500, 375))
        p = folder / "c0" / f"img{i:04d}.jpg"
        Image.fromarray(natural_image(h, w, rng)).save(p, "JPEG", quality=90)
        paths.append(p)
    return paths


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.double() - b.double()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class TorchvisionReference:
    """The reference I-JEPA's transforms as torchvision runs them on a Pillow image: decode,
    RandomResizedCrop (one bilinear resize straight from the box), to-tensor, normalise."""

    def __init__(self, root: Path, crop: int, scale=(0.3, 1.0)):
        self.paths = sorted(str(p) for p in Path(root).rglob("*.jpg"))
        self.crop, self.scale = crop, scale
        self.mean, self.std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as img:
            img = img.convert("RGB")
        top, left, h, w = sample_crop_box(img.height, img.width, self.scale, (3 / 4, 4 / 3), None)
        img = img.resize((self.crop, self.crop), Image.BILINEAR, box=(left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, 0


def training_dataset(root: Path, crop: int) -> ImageFolder:
    """The image folder exactly as a training run builds it (the trainer passes its device)."""
    cfg = {"dataset": "imagefolder", "root_path": str(root), "image_folder": "", "crop_size": crop, "crop_scale": [0.3, 1.0]}
    return build_dataset(cfg, device=torch.device("cpu"))


def pipelines(root: Path, crop: int) -> dict:
    kw = dict(crop_size=crop, crop_scale=(0.3, 1.0))
    return {
        "reference": TorchvisionReference(root, crop),
        "fastjepa": training_dataset(root, crop),
        "fastjepa-float": ImageFolder(root, **kw),  # the class's defaults: output="float"
        "reference-imagefolder": ImageFolder(root, fast_decode=False, output="float", **kw),
        "uint8-only": ImageFolder(root, fast_decode=False, output="uint8", **kw),
        "fastjepa-pillow": ImageFolder(root, fast_decode=True, output="uint8", **kw),  # run with simplejpeg hidden
        "gpu-worker": ImageFolder(root, fast_decode=True, output="uint8", decode="gpu", **kw),
    }


def run_pass(name: str, ds: ImageFolder, epoch: int) -> int:
    ds.set_epoch(epoch)
    saved = fast._simplejpeg
    if name == "fastjepa-pillow":
        fast._simplejpeg = False
    try:
        for i in range(len(ds)):
            ds[i]
    finally:
        fast._simplejpeg = saved
    return len(ds)


def check(dss: dict, n: int) -> dict:
    """The fast path's crops against the reference's (the same boxes: PSNR of the pixels)."""
    ref, fst = dss["uint8-only"], dss["fastjepa"]
    values = [psnr(ref[i][0], fst[i][0]) for i in range(min(n, len(ref)))]
    f = dss["reference"][0][0]
    assert fst.output == "uint8" and fst.decode == "cpu", "the training dataset: uint8 crops decoded on the CPU"
    assert f.dtype == torch.float32 and fst[0][0].dtype == torch.uint8 and fst[0][0].shape == f.shape
    assert min(values) >= 30, f"fast decode PSNR {min(values):.1f} dB against the full decode: expected >= 30"
    return {"psnr_min_db": min(values), "psnr_mean_db": statistics.mean(v for v in values if v != float("inf")) if any(
        v != float("inf") for v in values) else float("inf"), "images": len(values)}  # fmt: skip


def per_core(dss: dict, rounds: int) -> dict[str, dict]:
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {k: [] for k in dss}
    walls: dict[str, list[float]] = {k: [] for k in dss}
    for k, ds in dss.items():  # warm-up: page cache, imports, allocator
        run_pass(k, ds, 1000)
    for r in range(rounds):
        for k, ds in dss.items():
            c0, w0 = time.process_time(), time.perf_counter()
            n = run_pass(k, ds, r)
            times[k].append(n / (time.process_time() - c0))
            walls[k].append(n / (time.perf_counter() - w0))
    return {k: {"images_per_s": statistics.median(times[k]), "images_per_s_wall": statistics.median(walls[k]),
                "rounds": times[k]} for k in dss}  # fmt: skip


def _worker(args) -> int:
    name, root, crop, seconds, seed = args
    torch.set_num_threads(1)
    ds = pipelines(Path(root), crop)[name]
    t0, n, epoch = time.perf_counter(), 0, seed * 1000
    while time.perf_counter() - t0 < seconds:
        n += run_pass(name, ds, epoch)
        epoch += 1
    return n, time.perf_counter() - t0


def all_cores(root: Path, crop: int, names: list[str], procs: int, seconds: float) -> dict[str, dict]:
    out = {}
    ctx = multiprocessing.get_context("fork")
    for name in names:
        with ctx.Pool(procs) as pool:
            res = pool.map(_worker, [(name, str(root), crop, seconds, p) for p in range(procs)])
        out[name] = {"images_per_s": sum(n / t for n, t in res), "processes": procs}
    return out


def gpu_decode(root: Path, crop: int, batch: int, seconds: float) -> dict:
    """``data.decode=gpu`` on the device: nvjpeg decode + crop + resize + normalise of whole
    batches (the worker side precomputed), images/s by the wall clock with the device synced;
    checked against the CPU fast path (PSNR) first. ``{"unavailable": why}`` where it cannot run."""
    from torch.utils.data import default_collate

    from fastjepa.data import batch_to_device
    from fastjepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    dev = torch.device("cuda")
    reason = fast.gpu_decode_unavailable(dev)
    if reason is not None:
        return {"unavailable": reason}
    ds = ImageFolder(root, crop_size=crop, output="uint8", decode="gpu")
    cpu = ImageFolder(root, crop_size=crop, output="uint8")
    idx = [i % len(ds) for i in range(batch)]
    udata = default_collate([ds[i] for i in idx])
    counts0 = fast.gpu_decode_counts()
    out = batch_to_device(udata, dev, ds)
    ref = batch_to_device(default_collate([cpu[i] for i in idx]), "cpu")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    worst = min(psnr((out.cpu()[i] * std[0] + mean[0]) * 255, (ref[i] * std[0] + mean[0]) * 255) for i in range(batch))
    assert worst >= 30, f"GPU decode PSNR {worst:.1f} dB against the CPU fast path: expected >= 30"
    torch.cuda.synchronize()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch_to_device(udata, dev, ds)
        n += batch
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    counts = {k: v - counts0[k] for k, v in fast.gpu_decode_counts().items()}
    return {"images_per_s": n / dt, "batch": batch, "device": torch.cuda.get_device_name(dev), "psnr_min_db_vs_cpu_fast": worst,
            "nvjpeg_images": counts["nvjpeg"], "cpu_fallbacks": counts["cpu_fallback"], "raw_images": counts["raw"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few small files, one round: seconds, for the test suite")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--files", type=int, default=32, help="JPEGs to write per set")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per pipeline (median)")
    ap.add_argument("--seconds", type=float, default=4.0, help="all-cores phase: wall seconds per pipeline")
    ap.add_argument("--procs", type=int, default=0, help="all-cores phase: processes (0: the cores this process may use)")
    ap.add_argument("--large", action="store_true", help="also time a set of 1600×1200 sources")
    ap.add_argument("--step-rates", default="1000,2500,5000", help="images/s per GPU to size the loader for")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--stem", default=None, help="report name (default cpu-<date>-data)")
    ap.add_argument("--gpu", action="store_true", help="also time data.decode=gpu on the CUDA device (batches of --batch)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--no-all-cores", dest="all_cores", action="store_false", help="skip the all-cores phase")
    args = ap.parse_args()
    if args.quick:
        args.files, args.rounds, args.seconds, args.large = 4, 1, 0.2, False
    procs = args.procs or len(os.sched_getaffinity(0))
    rates = [float(r) for r in args.step_rates.split(",") if r]

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sets = {"500x375": dict(n=args.files, large_every=0)}
    if not args.quick:
        sets["imagenet-mix"] = dict(n=args.files, large=(768, 1024), large_every=8)
    if args.large:
        sets["1600x1200"] = dict(n=max(8, args.files // 4), large=(1200, 1600), large_every=1)
    result = {"date": date, "cpu": cpu_name(), "threads": 1, "torch": torch.__version__, "crop": args.crop,
              "simplejpeg": getattr(fast.simplejpeg_module(), "__version__", None), "quick": args.quick,
              "sets": {}}  # fmt: skip
    stem = args.stem or f"cpu-{date[:10]}-data"

    def flush() -> None:  # after every phase: a run cut short keeps what it finished
        write_report(args.out, stem, result, render(result, args, procs, date))

    with tempfile.TemporaryDirectory(prefix="fastjepa-bench-data-") as tmp:
        for set_name, spec in sets.items():
            root = Path(tmp) / set_name
            paths = write_jpegs(root, spec["n"], large=spec.get("large", (768, 1024)), large_every=spec["large_every"])
            sizes = [Image.open(p).size for p in paths]
            s = result["sets"][set_name] = {"files": len(paths), "mean_kb": statistics.mean(p.stat().st_size for p in paths) / 1e3,
                                            "sizes": sorted({f"{w}x{h}" for w, h in sizes})}  # fmt: skip
            dss = pipelines(root, args.crop)
            s["check"] = check(dss, len(paths))
            core = per_core(dss, args.rounds)
            ref = core["reference"]["images_per_s"]
            s.update({"per_core": core, "speedup_per_core": {k: v["images_per_s"] / ref for k, v in core.items()},
                      "cores_per_gpu": {f"{r:g}": {k: r / core[k]["images_per_s"] for k in ("reference", "fastjepa")} for r in rates}})  # fmt: skip
            flush()
            if args.all_cores:
                cores = all_cores(root, args.crop, ["reference", "fastjepa"], procs, args.seconds)
                s.update({"all_cores": cores, "speedup_all_cores": cores["fastjepa"]["images_per_s"] / cores["reference"]["images_per_s"]})
                flush()
            if args.gpu:
                try:
                    s["gpu_decode"] = gpu_decode(root, args.crop, args.batch, args.seconds)
                except Exception as exc:  # the CPU rows stand; the GPU row says what went wrong
                    s["gpu_decode"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                flush()
    print(render(result, args, procs, date))


def render(result: dict, args, procs: int, date: str) -> str:
    lines = [f"# imagefolder pipeline, crop {args.crop} ({date})", "",
             f"CPU: {result['cpu']}, {procs} cores for this process, one torch thread per loader core, torch {result['torch']}, "
             f"simplejpeg {result['simplejpeg'] or 'not installed'}. Per core: CPU time of one process (median of "
             f"{args.rounds} interleaved rounds, files in the page cache); all cores: {procs} processes, wall clock. "
             "fastjepa = the dataset as training builds it (uint8 crops; normalised on the device); fastjepa-float = "
             "ImageFolder's defaults (normalised on this core); reference = Pillow + RandomResizedCrop from the box + "
             "to-tensor + normalise, as torchvision runs the reference's transforms."
             + (" **--quick: a smoke run, not a measurement.**" if args.quick else ""), ""]  # fmt: skip
    for set_name, s in result["sets"].items():
        lines += [f"## {set_name}: {s['files']} JPEGs ({', '.join(s['sizes'])}), q90, mean {s['mean_kb']:.0f} KB", ""]
        if "per_core" not in s:
            lines += ["(cut short before the per-core timing)", ""]
            continue
        lines += ["| pipeline | images/s per core | × reference | images/s, wall |", "|---|---:|---:|---:|"]
        for k, v in s["per_core"].items():
            lines.append(f"| {k} | {v['images_per_s']:,.0f} | {s['speedup_per_core'][k]:.2f} | {v['images_per_s_wall']:,.0f} |")
        if "all_cores" in s:
            ac = s["all_cores"]
            lines += ["", f"All {procs} cores: reference {ac['reference']['images_per_s']:,.0f} images/s, fastjepa "
                      f"{ac['fastjepa']['images_per_s']:,.0f} images/s (×{s['speedup_all_cores']:.2f})."]  # fmt: skip
        lines += ["", "| step rate (images/s per GPU) | cores per GPU, reference | cores per GPU, fastjepa |", "|---:|---:|---:|"]
        for r, c in s["cores_per_gpu"].items():
            lines.append(f"| {float(r):,.0f} | {c['reference']:.1f} | {c['fastjepa']:.1f} |")
        if "gpu_decode" in s:
            g = s["gpu_decode"]
            if "unavailable" in g:
                lines += ["", f"GPU decode (data.decode=gpu): unavailable — {g['unavailable']}."]
            elif "error" in g:
                lines += ["", f"GPU decode (data.decode=gpu): **ERROR** — {g['error']}."]
            else:
                fb = g["cpu_fallbacks"]
                lines += ["", f"GPU decode (data.decode=gpu) on {g['device']}: {g['images_per_s']:,.0f} images/s in batches of {g['batch']} "
                          f"(nvjpeg decode, crop, resize, normalise; PSNR ≥ {g['psnr_min_db_vs_cpu_fast']:.1f} dB against the CPU fast path); "
                          f"nvjpeg decoded {g['nvjpeg_images']} images, " + (f"**{fb} fell back to the CPU decode: these numbers are not "
                          "nvjpeg's alone**." if fb else "none fell back to the CPU.")]  # fmt: skip
        lines += ["", f"Check before timing: fastjepa crops vs the full decode, PSNR min {s['check']['psnr_min_db']:.1f} dB, "
                  f"mean {s['check']['psnr_mean_db']:.1f} dB over {s['check']['images']} images (same boxes).", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
