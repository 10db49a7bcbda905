"""The built wheel (not the source checkout) holds everything the package loads at run time."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_kernels_and_configs_and_runs_from_an_install(tmp_path):
    # build from a clean copy: an in-tree build/ could carry stale files into the wheel
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "__pycache__", "*.so", ".*cache"))
    env = dict(os.environ, FASTJEPA_NO_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastjepa-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in ("__init__", "_tiles", "gather_tokens", "predictor_tokens", "target_tokens", "smooth_l1_loss"):
        assert f"fastjepa/kernels/{kernel}.py" in names, kernel
    for module in ("checkpoint/__init__", "checkpoint/core", "checkpoint/tools", "checkpoint/__main__", "rng", "version"):
        assert f"fastjepa/{module}.py" in names, module
    for cfg in ("default", "in1k_vith14_ep300", "in1k_vitl16_ep300", "in1k_vitb16_ep300"):
        assert f"fastjepa/configs/{cfg}.yaml" in names, cfg
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    code = (
        "import fastjepa, sys\n"
        f"assert fastjepa.__file__.startswith({str(tmp_path / 'site')!r}), fastjepa.__file__\n"
        "from fastjepa.config import load_config\n"
        "from fastjepa.ops._dispatch import kernels\n"
        "from fastjepa.checkpoint import load_encoder\n"
        f"assert kernels().__file__.startswith({str(tmp_path / 'site')!r}), kernels().__file__\n"
        "assert load_config(None)['meta']['model_name'] == 'vit_tiny'\n"
        "print('ok')\n"
    )
    run_env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=run_env)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
