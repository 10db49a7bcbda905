"""The CMake build of csrc/ against libtorch and its ctest (csrc/tests/test_main.cpp).

About 60-90 s on one core (three sources + the test). Marked ``slow``; skipped with the
reason when cmake, a C++ compiler or torch's CMake config is missing. Set
``FASTJEPA_SKIP_CMAKE=1`` to skip it where the time does not fit.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _why_skip():
    if os.environ.get("FASTJEPA_SKIP_CMAKE", "0") == "1":
        return "FASTJEPA_SKIP_CMAKE=1"
    for tool in ("cmake", "ctest"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler (c++ / $CXX) on PATH"
    if not (Path(torch.utils.cmake_prefix_path) / "Torch" / "TorchConfig.cmake").is_file():
        return f"torch's CMake config is not under {torch.utils.cmake_prefix_path}"
    return None


def test_cmake_build_and_ctest(tmp_path):
    why = _why_skip()
    if why:
        pytest.skip(why)
    build = tmp_path / "build"
    jobs = os.environ.get("MAX_JOBS", "1")

    def run(*cmd, timeout):
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout

    run("cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", timeout=120)
    run("cmake", "--build", str(build), "-j", jobs, timeout=600)
    out = run("ctest", "--test-dir", str(build), "--output-on-failure", timeout=120)
    assert "100% tests passed" in out, out
