"""Config: reference YAML files load unchanged; bad keys/types/mask settings are rejected."""

from pathlib import Path

import pytest

from fastjepa.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "fastjepa" / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "in1k_vith14_ep300.yaml", "in1k_vitl16_ep300.yaml", "in1k_vitb16_ep300.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg["data"]["batch_size"] > 0


def test_reference_values_of_vith14():
    cfg = load_config(CONFIGS / "in1k_vith14_ep300.yaml")
    assert cfg["meta"]["model_name"] == "vit_huge" and cfg["mask"]["patch_size"] == 14
    assert cfg["optimization"]["ema"] == [0.996, 1.0] and cfg["optimization"]["final_weight_decay"] == 0.4
    assert cfg["mask"]["num_pred_masks"] == 4 and cfg["data"]["crop_scale"] == [0.3, 1.0]


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["optimization.epochs=1", "data.batch_size=32", "optimization.ema=[0.99, 1.0]", "meta.use_bfloat16=true"])
    assert cfg["optimization"]["epochs"] == 1 and cfg["data"]["batch_size"] == 32
    assert cfg["optimization"]["ema"] == [0.99, 1.0] and cfg["meta"]["use_bfloat16"] is True


@pytest.mark.parametrize("override,match", [
    ("optimization.epoch=1", r"unknown key optimization\.epoch \(did you mean optimization\.epochs\?\)"),
    ("optimisation.epochs=1", r"unknown section 'optimisation' \(did you mean 'optimization'\?\)"),
    ("optimization.batch_size=8", r"unknown key optimization\.batch_size \(did you mean data\.batch_size\?\)"),
    ("optimization.zzz=1", r"unknown key optimization\.zzz; known keys"),
    ("data.batch_size=abc", r"data\.batch_size: got 'abc'.*expected an integer"),
    ("data.batch_size=1.5", "expected an integer"),
    ("mask.enc_mask_scale=[0.5]", r"two numbers"),
    ("meta.model_name=vit_enormous", "expected one of"),
    ("mask.min_keep=60", "impossible mask settings"),
    ("data.crop_size=30", "not a multiple of mask.patch_size"),
    ("optimization.epochs", "expected section.key=value"),
    ("data.batch_size=10", None),
])  # fmt: skip
def test_bad_values_are_rejected_with_names(override, match):
    if match is None:
        assert load_config(None, [override])["data"]["batch_size"] == 10
        return
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_grad_accum_divisibility():
    with pytest.raises(ConfigError, match="not divisible by optimization.grad_accum"):
        load_config(None, ["data.batch_size=10", "optimization.grad_accum=4"])


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"unknown key data\.batch_sise"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize("override, message", [
    ("optimization.ema=[1.0,0.9]", r"optimization.ema=\[1.0, 0.9\]: expected 0 <= start <= end <= 1"),
    ("optimization.ema=[0.9]", r"optimization.ema: got \[0.9\] \(list\), expected a list of two numbers"),
    ("optimization.warmup=999", r"optimization.warmup=999.0: expected between 0 and epochs·ipe_scale=10.0"),
    ("optimization.lr=fast", r"optimization.lr: got 'fast' \(str\), expected a number"),
    ("data.batch_size=0", r"data.batch_size: got 0, expected an integer >= 1"),
    ("mask.num_pred_masks=0", r"mask.num_pred_masks: got 0, expected an integer >= 1"),
    ("meta.use_bfloat16=maybe", r"meta.use_bfloat16: got 'maybe' \(str\), expected true or false"),
    ("meta.max_steps=0", r"meta.max_steps=0: expected an integer >= 1 or null"),
    ("data.dataset=imagefolder", r"data.dataset=imagefolder needs data.root_path and data.image_folder"),
    ("data.use_color_distortion=true", r"data.use_color_distortion / data.use_gaussian_blur: not supported .*; set false"),
    ("mask.aspect_ratio=[2.0,1.0]", r"aspect_ratio=\[2.0, 1.0\]: expected low <= high"),
])  # fmt: skip
def test_bad_values_name_the_key_the_value_and_what_was_expected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_model_kwargs_say_which_keys_exist(tmp_path):
    from fastjepa.training.trainer import Trainer

    from ._tiny import TINY

    with pytest.raises(ConfigError, match=r"meta.model_kwargs: unknown key\(s\) \['dpth'\]; expected some of \[.*'depth'"):
        Trainer(load_config(None, [*TINY, "meta.model_kwargs={dpth: 1}"]), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
