"""Configuration: the reference's YAML sections and keys, plus fastjepa's additions.

``load_config(path, overrides)`` reads a YAML file (the reference's published files
unchanged, or fastjepa's), applies ``section.key=value`` overrides, fills defaults and
validates every key and type; anything wrong raises :class:`ConfigError` naming the key,
the value and what was expected, before any work starts.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, found before training starts."""


def one_line(exc: BaseException) -> str:
    """An error's message as one line, for a command line's one-line refusal. An error
    raised in a DataLoader worker arrives with the worker's traceback inside its message:
    its last line is the error itself."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    if len(lines) > 1 and lines[0].startswith("Caught ") and "worker" in lines[0]:
        last, name = lines[-1], type(exc).__name__
        return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return lines[0]


def os_error_line(exc: OSError) -> str:
    """An environment error (a full disk, a read-only folder) as one line: why, and which file."""
    what = exc.strerror or one_line(exc)
    return f"{what}: {exc.filename}" if exc.filename else what


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two changes: a key given twice in one mapping is an error
    (PyYAML keeps the last silently), and a number written with an exponent but no dot
    (``1e-3``, ``5E+2``) is a float, as YAML 1.2 reads it (YAML 1.1's float rule needs a
    dot, so PyYAML returns the string ``'1e-3'``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A PyYAML error as one line: what is wrong and where (PyYAML's own text spans several)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def yaml_load(text_or_stream) -> Any:
    """YAML through :class:`ConfigLoader` (duplicate keys refused, ``1e-3`` a float)."""
    return yaml.load(text_or_stream, Loader=ConfigLoader)  # noqa: S506 — ConfigLoader is a SafeLoader


# Each field: (kind, default, help). kinds: int, int_or_auto, float, bool, str, opt_str, pair, dict, or a tuple of allowed strings.
SCHEMA: dict[str, dict[str, tuple[Any, Any, str]]] = {
    "data": {
        "dataset": (("embedded", "imagefolder", "synthetic"), "embedded", "data source (fastjepa)"),
        "batch_size": ("int", 128, "images per GPU / process per step (as the reference)"),
        "crop_size": ("int", 224, "square crop fed to the model"),
        "crop_scale": ("pair", [0.3, 1.0], "RandomResizedCrop area range"),
        "root_path": ("opt_str", None, "imagefolder: root folder"),
        "image_folder": ("opt_str", None, "imagefolder: training folder under root_path"),
        "val_folder": ("opt_str", None, "imagefolder: held-out folder under root_path, for evaluation (fastjepa)"),
        "synthetic_samples": ("int", 1024, "synthetic: images per epoch (fastjepa)"),
        "num_workers": ("int_or_auto", "auto", "DataLoader worker processes; auto: 0 for in-memory data, else the process's cores but one"),
        "pin_mem": ("bool", True, "pinned host memory (CUDA only)"),
        "fast_decode": ("bool", True, "imagefolder: decode only what the crop needs; false: the reference's full decode, exactly (fastjepa)"),
        "decode": (("cpu", "gpu", "auto"), "cpu", "imagefolder: decode JPEGs in the loader workers, on the GPU (nvjpeg, needs torchvision) or gpu where possible (fastjepa)"),
        "use_horizontal_flip": ("bool", False, "random horizontal flip"),
        "use_color_distortion": ("bool", False, "colour distortion (not used by any published config; unsupported)"),
        "use_gaussian_blur": ("bool", False, "Gaussian blur (not used by any published config; unsupported)"),
        "color_jitter_strength": ("float", 0.0, "accepted for compatibility; unused"),
    },
    "logging": {
        "folder": ("opt_str", None, "output folder (the command line's --output wins)"),
        "write_tag": ("str", "jepa", "checkpoint / log file prefix"),
        "log_freq": ("int", 10, "console line, CSV flush and loss check every N iterations (fastjepa)"),
        "checkpoint_freq": ("int", 50, "keep an extra epoch checkpoint every N epochs (fastjepa)"),
        "tensorboard": ("bool", True, "write TensorBoard events when tensorboard is installed (fastjepa)"),
        "wandb": ("bool", False, "log to Weights & Biases when installed (fastjepa)"),
        "wandb_project": ("str", "fastjepa", "W&B project (fastjepa)"),
        "plots": ("bool", True, "write PNG plots at the end of training (fastjepa)"),
        "probe": ("bool", True, "quick linear-probe / k-NN evaluation at the end (embedded data) (fastjepa)"),
    },
    "mask": {
        "patch_size": ("int", 16, "ViT patch size"),
        "num_enc_masks": ("int", 1, "context blocks per image (nenc)"),
        "num_pred_masks": ("int", 4, "target blocks per image (npred)"),
        "enc_mask_scale": ("pair", [0.85, 1.0], "context block area range"),
        "pred_mask_scale": ("pair", [0.15, 0.2], "target block area range"),
        "aspect_ratio": ("pair", [0.75, 1.5], "target block aspect range"),
        "min_keep": ("int", 10, "a mask needs more than this many patches"),
        "allow_overlap": ("bool", False, "let context and targets overlap"),
        "compat": (("fastjepa", "reference"), "fastjepa", "which masks: 'reference' reproduces the reference sampler exactly (fastjepa)"),
        "backend": (("auto", "cpp", "python"), "auto", "which implementation samples mask.compat=fastjepa masks (same distribution, not the same indices); auto: C++ where built (fastjepa)"),
    },
    "meta": {
        "model_name": (("vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"), "vit_base", "encoder"),
        "model_kwargs": ("dict", {}, "encoder constructor overrides, e.g. {depth: 6} (fastjepa)"),
        "pred_depth": ("int", 6, "predictor depth"),
        "pred_emb_dim": ("int", 384, "predictor width"),
        "pred_num_heads": ("opt_int", None, "predictor heads (default: the encoder's, as the reference) (fastjepa)"),
        "use_bfloat16": ("bool", False, "bf16 autocast on CUDA"),
        "load_checkpoint": ("bool", False, "resume from the output folder's latest checkpoint (as --resume)"),
        "read_checkpoint": ("opt_str", None, "checkpoint file to resume from (default: <tag>-latest.pth.tar)"),
        "copy_data": ("bool", False, "accepted for compatibility; unused"),
        "seed": ("int", 0, "seed for init, data order, crops and masks (fastjepa)"),
        "device": (("auto", "cpu", "cuda"), "auto", "CUDA when present unless set (fastjepa)"),
        "compile": ("bool", False, "torch.compile the transformer blocks (fastjepa)"),
        "activation_checkpointing": ("bool", False, "recompute block activations in backward (fastjepa)"),
        "fsdp": ("bool", False, "shard encoder/predictor/target with FSDP2 under torchrun (fastjepa)"),
        "reference_step": ("bool", False, "the reference's step: reference ops, math attention, fp32 pos-embed under autocast, per-parameter AdamW and EMA, GradScaler; not the masks (mask.compat) (fastjepa)"),
        "max_steps": ("opt_int", None, "stop after this many optimizer steps (fastjepa; benchmarks and tests)"),
        "on_collapse": (("warn", "stop"), "warn", "when the collapse detector fires (health.*): warn, or write the checkpoint and stop (fastjepa)"),
    },
    "optimization": {
        "epochs": ("int", 300, "training epochs"),
        "warmup": ("float", 40, "LR warmup epochs"),
        "start_lr": ("float", 2e-4, "LR at step 0"),
        "lr": ("float", 1e-3, "peak LR"),
        "final_lr": ("float", 1e-6, "LR at the end"),
        "weight_decay": ("float", 0.04, "WD at step 0"),
        "final_weight_decay": ("float", 0.4, "WD at the end"),
        "ema": ("pair", [0.996, 1.0], "EMA momentum start, end"),
        "ipe_scale": ("float", 1.0, "schedule length multiplier"),
        "grad_accum": ("int", 1, "micro-batches per optimizer step (fastjepa)"),
        "clip_grad": ("opt_float", None, "max gradient norm (fastjepa; off as the reference)"),
        "nan_policy": (("stop", "skip"), "stop", "non-finite loss: stop the run, or skip the step (fastjepa)"),
        "time_budget_s": ("opt_float", None, "train at most about this long: fewer epochs, chosen from a measured step time (fastjepa)"),
        "budget_steps": ("opt_int", None, "stop after this many optimizer steps of epoch 1, schedules fitted to them: what time_budget_s "
                         "chooses when one epoch does not fit, recorded in config.yaml (fastjepa; null: whole epochs)"),
    },
    "health": {
        "enabled": ("bool", True, "RankMe, std and prediction cosine of the features at every log step, read with the losses (fastjepa)"),
        "max_rows": ("int", 256, "rows of pooled features in each RankMe (a fixed cost per log step) (fastjepa)"),
        "rankme_fraction": ("float", 0.5, "collapse: target RankMe beyond its first direction (rankme - 1) below this fraction of the run's peak ... (fastjepa)"),
        "std_floor": ("float", 1e-4, "... or target std below this ... (fastjepa)"),
        "patience": ("int", 3, "... for this many log steps in a row (fastjepa)"),
        "keep_best": ("bool", True, "keep <tag>-best.pth.tar: the epoch checkpoint with the highest target RankMe (fastjepa)"),
    },
}


def defaults() -> dict[str, dict[str, Any]]:
    return {sec: {k: copy.deepcopy(spec[1]) for k, spec in fields.items()} for sec, fields in SCHEMA.items()}


def _check_value(key: str, kind: Any, value: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key {key}: got {value!r} ({type(value).__name__}), expected {expected}")

    if isinstance(kind, tuple):
        if value not in kind:
            raise bad("one of " + ", ".join(repr(k) for k in kind))
        return value
    if kind == "int" or (kind == "opt_int" and value is not None):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if kind == "float" or (kind == "opt_float" and value is not None):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if not math.isfinite(value):
            raise bad("a finite number")
        return float(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if kind == "opt_str":
        if value is not None and not isinstance(value, str):
            raise bad("a string or null")
        return value
    if kind == "pair":
        if not isinstance(value, (list, tuple)) or len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
            raise bad("a list of two numbers [low, high]")
        if not all(math.isfinite(v) for v in value):
            raise bad("a list of two finite numbers [low, high]")
        return [float(v) for v in value]
    if kind == "dict":
        if not isinstance(value, dict):
            raise bad("a mapping")
        return value
    if kind == "int_or_auto":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise bad("an integer or 'auto'")
        return value
    if kind in ("opt_int", "opt_float"):
        return value
    raise AssertionError(kind)


def parse_override(text: str) -> tuple[str, str, Any]:
    """``"section.key=value"`` -> (section, key, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. optimization.epochs=1")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: expected section.key=value with a section among {', '.join(SCHEMA)}")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({yaml_error_line(exc)})") from None
    return parts[0], parts[1], value


def _did_you_mean(sec: str | None, key: str) -> str:
    """' (did you mean X?)' for a misspelt section or key, or a key put in the wrong
    section; '' when nothing is close."""
    import difflib

    if sec is None:
        close = difflib.get_close_matches(key, list(SCHEMA), n=1, cutoff=0.6)
        return f" (did you mean {close[0]!r}?)" if close else ""
    elsewhere = [f"{other}.{key}" for other in SCHEMA if other != sec and key in SCHEMA[other]]
    if elsewhere:
        return f" (did you mean {elsewhere[0]}?)"
    close = difflib.get_close_matches(key, list(SCHEMA[sec]), n=1, cutoff=0.6)
    return f" (did you mean {sec}.{close[0]}?)" if close else ""


def merge(base: dict, update: Mapping, source: str) -> dict:
    for sec, fields in update.items():
        if sec not in SCHEMA:
            hint = _did_you_mean(None, str(sec))
            raise ConfigError(f"{source}: unknown section {sec!r}{hint}; expected one of {', '.join(SCHEMA)}")
        if fields is None:
            continue
        if not isinstance(fields, Mapping):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping, got {type(fields).__name__}")
        for key, value in fields.items():
            if key not in SCHEMA[sec]:
                known = ", ".join(sorted(SCHEMA[sec]))
                hint = _did_you_mean(sec, str(key))
                raise ConfigError(f"{source}: unknown key {sec}.{key}{hint}; known keys of {sec}: {known}")
            base[sec][key] = _check_value(f"{sec}.{key}", SCHEMA[sec][key][0], value)
    return base


def validate(cfg: dict) -> dict:
    """Cross-field checks: things that would fail later or hang (see MaskCollator)."""
    d, m, meta, o = cfg["data"], cfg["mask"], cfg["meta"], cfg["optimization"]
    for key, v, lo in (
        ("data.batch_size", d["batch_size"], 1),
        ("data.crop_size", d["crop_size"], 1),
        ("mask.patch_size", m["patch_size"], 1),
        ("mask.num_enc_masks", m["num_enc_masks"], 1),
        ("mask.num_pred_masks", m["num_pred_masks"], 1),
        ("mask.min_keep", m["min_keep"], 0),
        ("optimization.epochs", o["epochs"], 1),
        ("optimization.grad_accum", o["grad_accum"], 1),
        ("logging.log_freq", cfg["logging"]["log_freq"], 1),
        ("logging.checkpoint_freq", cfg["logging"]["checkpoint_freq"], 1),
        ("meta.pred_depth", meta["pred_depth"], 1),
        ("meta.pred_emb_dim", meta["pred_emb_dim"], 1),
        ("data.num_workers", 0 if d["num_workers"] == "auto" else d["num_workers"], 0),
    ):
        if v < lo:
            raise ConfigError(f"config key {key}: got {v}, expected an integer >= {lo}")
    _check_ranges(cfg)
    if d["crop_size"] % m["patch_size"] != 0:
        raise ConfigError(f"data.crop_size={d['crop_size']} is not a multiple of mask.patch_size={m['patch_size']}")
    if d["batch_size"] % o["grad_accum"] != 0:
        raise ConfigError(
            f"data.batch_size={d['batch_size']} is not divisible by optimization.grad_accum={o['grad_accum']} "
            "(each micro-batch gets batch_size / grad_accum images)"
        )
    if d["use_color_distortion"] or d["use_gaussian_blur"]:
        raise ConfigError("data.use_color_distortion / data.use_gaussian_blur: not supported (no published I-JEPA config uses them); set false")
    if d["dataset"] == "imagefolder" and not (d["root_path"] or d["image_folder"]):
        raise ConfigError("data.dataset=imagefolder needs data.root_path and data.image_folder (the training images)")
    if o["ema"][0] > o["ema"][1] or not 0 <= o["ema"][0] <= 1 or not 0 <= o["ema"][1] <= 1:
        raise ConfigError(f"optimization.ema={o['ema']}: expected 0 <= start <= end <= 1")
    if o["warmup"] < 0 or o["warmup"] > o["epochs"] * o["ipe_scale"]:
        raise ConfigError(f"optimization.warmup={o['warmup']}: expected between 0 and epochs·ipe_scale={o['epochs'] * o['ipe_scale']}")
    if o["time_budget_s"] is not None and not o["time_budget_s"] > 0:
        raise ConfigError(f"optimization.time_budget_s={o['time_budget_s']}: expected a number of seconds > 0, or null for no budget")
    if o["budget_steps"] is not None and o["budget_steps"] < 1:
        raise ConfigError(f"optimization.budget_steps={o['budget_steps']}: expected an integer >= 1 or null")
    if meta["max_steps"] is not None and meta["max_steps"] < 1:
        raise ConfigError(f"meta.max_steps={meta['max_steps']}: expected an integer >= 1 or null")
    h = cfg["health"]
    if h["max_rows"] < 2:
        raise ConfigError(f"health.max_rows={h['max_rows']}: expected an integer >= 2 (rows of features per RankMe)")
    if h["patience"] < 1:
        raise ConfigError(f"health.patience={h['patience']}: expected an integer >= 1 (log steps in a row)")
    if not 0.0 <= h["rankme_fraction"] < 1.0:
        raise ConfigError(f"health.rankme_fraction={h['rankme_fraction']}: expected a fraction in [0, 1) of the run's peak RankMe (0: off)")
    if not h["std_floor"] >= 0.0:
        raise ConfigError(f"health.std_floor={h['std_floor']}: expected a number >= 0 (0: off)")
    if meta["on_collapse"] == "stop" and not h["enabled"]:
        raise ConfigError("meta.on_collapse=stop needs health.enabled=true (the detector reads the health metrics)")
    # mask feasibility: the collator's own check, with the config's names in the message
    from .masks import MaskCollator

    try:
        MaskCollator.from_config(cfg, backend="python")
    except ValueError as exc:
        raise ConfigError(f"impossible mask settings (mask.* with data.crop_size={d['crop_size']}): {exc}") from None
    return cfg


# the encoder constructor's numeric keys (meta.model_kwargs) and the least each may be
MODEL_KWARGS_MIN = {"embed_dim": 1, "depth": 1, "num_heads": 1, "in_chans": 1}
MODEL_KWARGS_UNIT = ("drop_rate", "attn_drop_rate", "drop_path_rate")  # probabilities in [0, 1)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")


def _check_ranges(cfg: dict) -> None:
    """Every number within its meaning: rates and decays not negative, scales ordered and
    in range (the mask.* pairs: the mask collator's own check, below), the write tag a plain file-name part. Raises :class:`ConfigError` naming the key."""
    d, meta, o = cfg["data"], cfg["meta"], cfg["optimization"]

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key}: got {value!r}, expected {expected}")

    for key in ("start_lr", "lr", "final_lr", "weight_decay", "final_weight_decay"):
        need(o[key] >= 0, f"optimization.{key}", o[key], "a number >= 0")
    need(o["ipe_scale"] > 0, "optimization.ipe_scale", o["ipe_scale"], "a number > 0 (the schedule length multiplier)")
    need(o["clip_grad"] is None or o["clip_grad"] > 0, "optimization.clip_grad", o["clip_grad"], "a max gradient norm > 0, or null for no clipping")
    lo, hi = d["crop_scale"]
    need(0 < lo <= hi <= 1, "data.crop_scale", d["crop_scale"], "[low, high] with 0 < low <= high <= 1 (fractions of the image area)")
    need(d["color_jitter_strength"] >= 0, "data.color_jitter_strength", d["color_jitter_strength"], "a number >= 0")
    need(meta["pred_num_heads"] is None or meta["pred_num_heads"] >= 1, "meta.pred_num_heads", meta["pred_num_heads"],
         "an integer >= 1, or null for the encoder's head count")  # fmt: skip
    need(d["synthetic_samples"] >= 1, "data.synthetic_samples", d["synthetic_samples"], "an integer >= 1")
    for key, value in meta["model_kwargs"].items():
        name = f"meta.model_kwargs.{key}"
        if key in MODEL_KWARGS_MIN:
            need(isinstance(value, int) and not isinstance(value, bool) and value >= MODEL_KWARGS_MIN[key], name, value,
                 f"an integer >= {MODEL_KWARGS_MIN[key]}")  # fmt: skip
        elif key == "mlp_ratio" or key == "init_std":
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0, name, value,
                 "a finite number > 0")  # fmt: skip
        elif key in MODEL_KWARGS_UNIT:
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, name, value, "a number in [0, 1)")
    tag = cfg["logging"]["write_tag"]
    need(bool(_PLAIN_NAME.match(tag)) and ".." not in tag, "logging.write_tag", tag,
         "a plain name for the run's files, e.g. jepa (letters, digits, '_', '-', '.', '+'; no folder separators, "
         "no '..', not starting with '.'): everything a run writes stays inside its output folder")  # fmt: skip


def default_config_path() -> Path:
    return Path(str(resources.files("fastjepa") / "configs" / "default.yaml"))


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: pass a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path) as f:
            data = yaml_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults <- YAML file (default: the packaged CPU config) <- overrides, validated."""
    path = default_config_path() if path is None else Path(path)
    return apply_overrides(merge(defaults(), read_yaml(path), str(path)), overrides)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    """A validated copy of ``cfg`` with ``section.key=value`` overrides applied in order."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        sec, key, value = parse_override(text)
        merge(cfg, {sec: {key: value}}, f"override {text!r}")
    return validate(cfg)


def dump_config(cfg: dict, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False, default_flow_style=None)
