"""Installing on a GPU machine keeps the CUDA torch's Triton.

A CUDA torch pins its own Triton (torch 2.11+cu130: ``triton==3.6.0``). The GPU install
command, ``pip install --no-build-isolation -e '.[test]'`` with that torch already there,
must install neither another Triton nor another torch. Checked with ``pip install --dry-run
--report`` in a fresh virtual environment holding that torch's metadata (its name, version
and Triton pin: all the resolver reads) and Triton 3.6.0's. Skipped where pip cannot reach a
package index.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NETWORK_TROUBLE = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                   "ConnectTimeout", "ReadTimeout", "Max retries exceeded", "No matching distribution found for setuptools")  # fmt: skip
GPU_MACHINE = {  # torch 2.11.0+cu130 as a CUDA machine has it (PyPI's metadata: Triton pinned on Linux x86-64)
    "torch": ("2.11.0+cu130", ['triton==3.6.0; platform_system == "Linux" and platform_machine == "x86_64"']),
    "triton": ("3.6.0", []),
}


def fake_installed(site: Path, name: str, version: str, requires: list[str]) -> None:
    """A .dist-info that pip counts as an installed ``name==version`` requiring ``requires``."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
    (info / "METADATA").write_text("\n".join(meta) + "\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", FASTJEPA_NO_EXT="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, **kw)


def skip_if_offline(r: subprocess.CompletedProcess, what: str) -> None:
    out = r.stdout + r.stderr
    if r.returncode != 0 and any(s in out for s in NETWORK_TROUBLE):
        pytest.skip(f"{what}: pip cannot reach a package index ({out.strip().splitlines()[-1][:200]})")


@pytest.mark.slow
def test_gpu_install_command_keeps_the_cuda_torch_and_its_triton(tmp_path):
    venv = tmp_path / "venv"
    r = run([sys.executable, "-m", "venv", str(venv)])
    if r.returncode != 0:
        pytest.skip(f"cannot make a virtual environment with pip here: {r.stderr.strip()[-300:]}")
    py = str(venv / "bin" / "python")
    r = run([py, "-m", "pip", "install", "-q", "setuptools>=64", "wheel"])  # the build backend --no-build-isolation uses
    skip_if_offline(r, "installing setuptools")
    assert r.returncode == 0, r.stderr[-3000:]
    site = Path(run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    for name, (version, requires) in GPU_MACHINE.items():
        fake_installed(site, name, version, requires)
    listed = run([py, "-m", "pip", "list", "--format=json"])
    have = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    assert have["torch"] == "2.11.0+cu130" and have["triton"] == "3.6.0", have

    src = tmp_path / "src"  # a clean copy: an editable metadata build writes into the tree
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "runs", "__pycache__", "*.so", ".*cache"))
    report = tmp_path / "report.json"
    # the command in the docs for a GPU machine (its MAX_JOBS only speeds up the extension build)
    r = run([py, "-m", "pip", "install", "--dry-run", "--report", str(report), "--no-build-isolation", "-e", f"{src}[test]"])
    skip_if_offline(r, "the dry run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    would = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert "fastjepa" in would, would
    assert "triton" not in would and "torch" not in would, f"the GPU install would replace the CUDA torch's Triton or torch: {would}"
