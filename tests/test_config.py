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
