"""The mask visualiser: ``python -m fastjepa.masks --show`` writes a grid PNG of the right size."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastjepa.masks.__main__ import CONTEXT_COLOR, LEGEND_H, PAD, TARGET_COLORS, grid_size, main, panel_scale, render_masks


@pytest.mark.parametrize("num,cols", [(8, 4), (3, 4), (5, 2)])
def test_show_writes_png_of_the_grid_size(tmp_path, num, cols):
    out = tmp_path / "m.png"
    assert main(["--show", "--output", str(out), "--num", str(num), "--cols", str(cols)]) == 0
    with Image.open(out) as img:
        assert img.size == grid_size(num, cols, 32)
    cols = min(cols, num)
    rows = -(-num // cols)
    assert grid_size(num, cols, 32) == (cols * 32 * panel_scale(32) + (cols + 1) * PAD, LEGEND_H + rows * 192 + (rows + 1) * PAD)


def test_colours_land_on_the_right_patches():
    imgs = torch.zeros(1, 3, 16, 16)  # black: tinted pixels are pure mask colour × alpha
    enc = [torch.tensor([[0, 1]])]
    pred = [torch.tensor([[15]]), torch.tensor([[5]])]
    im = np.asarray(render_masks(imgs, enc, pred, patch_size=4, alpha=0.5)).astype(int)
    s, cell = panel_scale(16), 4 * panel_scale(16)
    ox, oy = PAD, LEGEND_H + PAD

    def centre(idx):
        r, c = divmod(idx, 4)
        return im[oy + r * cell + cell // 2, ox + c * cell + cell // 2]

    assert np.abs(centre(0) - np.array(CONTEXT_COLOR) * 0.5).max() <= 1
    assert np.abs(centre(15) - np.array(TARGET_COLORS[0]) * 0.5).max() <= 1
    assert np.abs(centre(5) - np.array(TARGET_COLORS[1]) * 0.5).max() <= 1
    assert centre(10).max() == 0 and s >= 1


def test_bad_settings_say_what_is_wrong(tmp_path, capsys):
    assert main(["--show", "--output", str(tmp_path / "x.png"), "mask.min_keep=40"]) == 2
    assert "min_keep" in capsys.readouterr().err
