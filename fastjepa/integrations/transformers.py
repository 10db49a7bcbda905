"""fastjepa for Hugging Face transformers' ``VJEPA2Model`` and ``IJepaModel``.

::

    import fastjepa.integrations.transformers
    fastjepa.integrations.transformers.apply()     # before or after `from transformers import VJEPA2Model`

``apply()`` imports transformers' V-JEPA 2 and I-JEPA modelling modules itself (transformers
is imported only then: ``import fastjepa`` and ``import fastjepa.integrations`` never do),
checks the version (5.x; tested with 5.25) and the signatures of what it replaces, and
patches the classes in place, so models built before and after the call take the patch.
Each flag swaps one piece (``False`` leaves it as it is):

* ``apply_masks``: ``modeling_vjepa2.apply_masks`` (the predictor's context gather and the
  model's ``masked_hidden_state`` / ``target_hidden_state``) and every ``from … import``
  copy -> :func:`fastjepa.ops.apply_masks`, the fused gather (masks moved to the tokens'
  device first, as the original does).
* ``rope``: ``VJEPA2RopeAttention.forward`` -> the q, k, v projections, q and k rotated by
  one :func:`fastjepa.ops.rope_qk` call (V-JEPA 2's frequency layout, which transformers'
  ``rotate_queries_or_keys`` reproduces: tables repeated whole, duplicated frequencies;
  grid ``(frames unbounded, grid_size, grid_size)`` from the config, positions from the
  position mask or ``arange``), then the same attention function the original picks
  (``config._attn_implementation``: SDPA by default) and ``proj``. The original builds the
  position ids per head and six sin/cos tables per call.
* ``predictor``: ``VJEPA2Predictor.forward`` -> the context gather, ``predictor_embeddings``,
  then the sorted sequence of context tokens and mask tokens in one pass
  (:func:`fastjepa.ops.sorted_predictor_tokens`: no repeat of the mask token over every
  patch, gather, cat, argsort and two gathers), the layers given the sorted positions, the
  norm, the un-sort and take of the targets as one gather
  (:func:`fastjepa.ops.sorted_predictor_take_targets`), ``proj``. One context and one target
  mask per call (what the model supports); anything else runs the original.
* ``patch_embed``: ``VJEPA2PatchEmbeddings3D.forward`` and ``IJepaPatchEmbeddings.forward`` ->
  the patch-sized convolution (kernel = stride) as what it is, one matmul: the input cut
  into patches by a reshape and one permuted copy, then ``F.linear`` with the kernel as a
  (hidden, C·t·p·p) matrix — the same sums as the convolution, without its overhead in
  forward and backward. A convolution with padding, dilation, groups, a size that does not
  divide, a subclass or hooks runs the original.
* ``mlp``: ``VJEPA2MLP.forward`` and ``IJepaMLP.forward`` -> ``fc1`` and the exact GELU as
  one oneDNN matmul with a GELU epilogue (:func:`fastjepa.ops.linear_gelu`) when no
  gradient is needed (feature extraction); with autograd, another activation, a wrapped
  ``fc1`` or hooks on it, the original.

``IJepaModel`` has little else to fuse: its attention already goes through transformers'
attention functions (SDPA by default) and it has no token gather (``patch_embed`` and
``mlp`` touch it).

Refuses (:class:`~fastjepa.integrations._patching.CodebaseMismatch`, naming what it
expected and found) when transformers is missing, is another major version, or its
classes do not have the signatures the replacements are written for.
"""

from __future__ import annotations

import importlib
import re
import types

import torch

from . import _common
from ._patching import CodebaseMismatch, PatchSet, class_patch, function_patches, parameters, replaces

API = "fastjepa.integrations.transformers.apply()"
CODEBASE = "Hugging Face transformers' VJEPA2Model / IJepaModel"
VERSIONS = ((5, 0), (6, 0))  # supported: min <= version < max
TESTED = "5.25"
VJEPA2 = "transformers.models.vjepa2.modeling_vjepa2"
IJEPA = "transformers.models.ijepa.modeling_ijepa"
_STATE = PatchSet("transformers")


# -- what is there: version and signatures -------------------------------------------------


def _version(text: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _expected_versions() -> str:
    (a, b), (c, _) = VERSIONS
    return f"transformers >= {a}.{b}, < {c} (tested with {TESTED})"


def _params(owner: type, attr: str) -> list[str]:
    fn = vars(owner).get(attr)
    return parameters(getattr(fn, "__fastjepa_original__", fn)) if fn is not None else []


_SIGNATURES = {
    VJEPA2: {
        ("VJEPA2RopeAttention", "forward"): ["self", "hidden_states", "position_mask"],
        ("VJEPA2RopeAttention", "get_position_ids"): ["self", "x", "masks"],
        ("VJEPA2Predictor", "forward"): ["self", "encoder_hidden_states", "context_mask", "target_mask", "kwargs"],
        ("VJEPA2PredictorEmbeddings", "forward"): ["self", "hidden_states", "context_mask", "target_mask", "mask_index"],
        ("VJEPA2MLP", "forward"): ["self", "hidden_state"],
        ("VJEPA2PatchEmbeddings3D", "forward"): ["self", "pixel_values_videos"],
    },
    IJEPA: {
        ("IJepaMLP", "forward"): ["self", "hidden_states"],
        ("IJepaPatchEmbeddings", "forward"): ["self", "pixel_values"],
    },
}
_FUNCTIONS = {VJEPA2: {"apply_masks": ["tensor", "masks"]}}


def _check_module(name: str, module: types.ModuleType) -> list[str]:
    problems = []
    for fn, want in _FUNCTIONS.get(name, {}).items():
        got = parameters(getattr(getattr(module, fn, None), "__fastjepa_original__", getattr(module, fn, None)))
        if got != want:
            problems.append(f"{name}.{fn}: expected ({', '.join(want)}), found " + (f"({', '.join(got)})" if got else "none"))
    for (cls_name, attr), want in _SIGNATURES[name].items():
        cls = getattr(module, cls_name, None)
        got = _params(cls, attr) if isinstance(cls, type) else []
        if got != want:
            found = f"({', '.join(got)})" if got else ("no such class" if not isinstance(cls, type) else "none")
            problems.append(f"{name}.{cls_name}.{attr}: expected ({', '.join(want)}), found {found}")
    return problems


def _identify() -> dict[str, types.ModuleType]:
    """transformers' two modelling modules, imported and checked; CodebaseMismatch otherwise."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise CodebaseMismatch(f"{API}: expected {_expected_versions()}, found none importable ({exc})") from None
    found = getattr(transformers, "__version__", "?")
    where = getattr(transformers, "__file__", None)
    v = _version(found)
    if v is None or not VERSIONS[0] <= v < VERSIONS[1]:
        raise CodebaseMismatch(f"{API}: expected {_expected_versions()}, found transformers {found} at {where}")
    mods = {}
    for name in (VJEPA2, IJEPA):
        try:
            mods[name] = importlib.import_module(name)
        except ImportError as exc:
            raise CodebaseMismatch(f"{API}: transformers {found} at {where} cannot import {name}: {exc}") from None
    problems = [p for name, m in mods.items() for p in _check_module(name, m)]
    if problems:
        raise CodebaseMismatch(
            f"{API}: transformers {found} at {where} is not the code the replacements are written for: " + "; ".join(problems)
            + f" (expected {_expected_versions()})"
        )
    return mods


# -- providers: one per flag --------------------------------------------------------------


def _on_device(masks: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [m.to(device) for m in masks]


def _apply_masks(mods):
    from ..ops import apply_masks as fused

    original = mods[VJEPA2].apply_masks

    @replaces(original)
    def apply_masks(tensor, masks):
        if _common.gather_applies(tensor, masks) is None:
            return original(tensor, masks)
        return fused(tensor, _on_device(masks, tensor.device))  # (M·B, K, D)

    return function_patches(original, apply_masks)


def _rope(mods):
    from ..ops.rope import rope_qk, rotated_width

    vj = mods[VJEPA2]

    def make(original):
        @replaces(original)
        def forward(self, hidden_states, position_mask=None):
            ids = position_mask
            if hidden_states.dim() != 3 or (ids is not None and (
                not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64)
                or ids.shape != hidden_states.shape[:2] or ids.device != hidden_states.device
            )):  # fmt: skip
                return original(self, hidden_states, position_mask)
            input_shape = hidden_states.shape[:-1]
            hidden_shape = (*input_shape, -1, self.attention_head_size)
            q = self.query(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, heads, N, hd)
            k = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
            v = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
            if rotated_width(self.attention_head_size, 3) > 0:  # the original rotates nothing below 6 channels
                q, k = rope_qk(q, k, ids, (None, self.grid_size, self.grid_size))
            attention_interface = vj.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, vj.eager_attention_forward
            )
            context_layer, attention_probs = attention_interface(
                self, q, k, v, None, is_causal=self.is_causal, scaling=self.scaling,
                dropout=0.0 if not self.training else self.dropout_prob,
            )  # fmt: skip
            context_layer = self.proj(context_layer.reshape(context_layer.size()[:-2] + (self.all_head_size,)))
            return context_layer, attention_probs

        return forward

    return [class_patch(vj.VJEPA2RopeAttention, "forward", make)]


def _one_mask(masks, B: int, device: torch.device) -> torch.Tensor | None:
    """The (B, K) mask of a one-element list on ``device``, or None."""
    ms = _common.masks_list(masks)
    if ms is None or len(ms) != 1 or ms[0].size(0) != B or ms[0].size(1) == 0 or ms[0].device != device:
        return None
    return ms[0]


def _predictor(mods):
    from ..ops import sorted_predictor_take_targets, sorted_predictor_tokens

    vj = mods[VJEPA2]

    def make(original):
        @replaces(original)
        def forward(self, encoder_hidden_states, context_mask, target_mask, **kwargs):
            x = encoder_hidden_states
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
                return original(self, encoder_hidden_states, context_mask, target_mask, **kwargs)
            cm, tm = _one_mask(context_mask, x.size(0), x.device), _one_mask(target_mask, x.size(0), x.device)
            if cm is None or tm is None:
                return original(self, encoder_hidden_states, context_mask, target_mask, **kwargs)
            x = vj.apply_masks(x, [cm])  # (B, Kc, D): the context tokens
            emb = self.embeddings
            ctx = emb.predictor_embeddings(x)  # (B, Kc, P)
            mask_token = emb.mask_tokens[1 % emb.num_mask_tokens]  # (1, 1, P): the original's default mask_index
            hidden_states, positions, order = sorted_predictor_tokens(ctx, [cm], [tm], mask_token, None)  # (B, Kc+Kt, P)
            for layer_module in self.layer:
                hidden_states = layer_module(hidden_states, positions, **kwargs)[0]
            hidden_states = self.layernorm(hidden_states)
            hidden_states = sorted_predictor_take_targets(hidden_states, order)  # (B, Kt, P), in target-mask order
            return vj.BaseModelOutput(last_hidden_state=self.proj(hidden_states))

        return forward

    return [class_patch(vj.VJEPA2Predictor, "forward", make)]


def _plain(m: torch.nn.Module) -> bool:
    """No hooks on ``m`` nor global module hooks: a fused path that skips ``m.__call__`` is unobservable."""
    g = torch.nn.modules.module
    return not (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
        or g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )  # fmt: skip


def _patch_conv(conv, conv_type: type, x, n: int) -> bool:
    """Whether ``conv`` (an exact ``conv_type``) is a plain patchify of ``x`` (B, C, *n sizes)."""
    return (
        type(conv) is conv_type and _plain(conv) and isinstance(x, torch.Tensor) and x.dim() == 2 + n
        and x.is_floating_point() and conv.groups == 1 and conv.padding_mode == "zeros"
        and tuple(conv.kernel_size) == tuple(conv.stride) and tuple(conv.padding) == (0,) * n
        and tuple(conv.dilation) == (1,) * n and x.size(1) == conv.in_channels
        and all(s % k == 0 and s > 0 for s, k in zip(x.shape[2:], conv.kernel_size))
    )  # fmt: skip


def patchify_linear(x: torch.Tensor, conv: torch.nn.Module) -> torch.Tensor:
    """``conv(x).flatten(2).transpose(1, 2)`` for a convolution whose kernel equals its stride
    (no padding, dilation or groups): x (B, C, *S) -> (B, prod(S // k), out_channels), as
    one matmul of the patches with the kernel."""
    k = tuple(conv.kernel_size)
    B, Cin = x.shape[:2]
    grid = [s // kk for s, kk in zip(x.shape[2:], k)]
    split = [B, Cin] + [v for g, kk in zip(grid, k) for v in (g, kk)]  # (B, C, g0, k0, g1, k1, …)
    n = len(k)
    order = [0] + [2 + 2 * i for i in range(n)] + [1] + [3 + 2 * i for i in range(n)]  # (B, g…, C, k…)
    patches = x.reshape(split).permute(order).reshape(B, -1, conv.weight[0].numel())  # (B, N, C·prod(k))
    return torch.nn.functional.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)


def _patch_embed(mods):
    vj, ij = mods[VJEPA2], mods[IJEPA]

    def make_video(original):
        @replaces(original)
        def forward(self, pixel_values_videos):
            if not _patch_conv(self.proj, torch.nn.Conv3d, pixel_values_videos, 3):
                return original(self, pixel_values_videos)
            return patchify_linear(pixel_values_videos, self.proj)  # (B, N, hidden)

        return forward

    def make_image(original):
        @replaces(original)
        def forward(self, pixel_values):
            if not _patch_conv(self.projection, torch.nn.Conv2d, pixel_values, 2) or pixel_values.shape[1] != self.num_channels:
                return original(self, pixel_values)  # its own channel check and message
            return patchify_linear(pixel_values, self.projection)  # (B, N, hidden)

        return forward

    return [class_patch(vj.VJEPA2PatchEmbeddings3D, "forward", make_video),
            class_patch(ij.IJepaPatchEmbeddings, "forward", make_image)]  # fmt: skip


def _mlp(mods):
    from ..ops.linear_gelu import fused_linear_gelu_applies, linear_gelu

    gelu_cls = getattr(importlib.import_module("transformers.activations"), "GELUActivation", None)

    def exact_gelu(act) -> bool:
        return gelu_cls is not None and type(act) is gelu_cls and getattr(act, "act", None) is torch.nn.functional.gelu

    def fused_applies(fc1, act, x) -> bool:
        return (
            type(fc1) is torch.nn.Linear and exact_gelu(act) and _plain(fc1) and _plain(act)
            and isinstance(x, torch.Tensor) and fused_linear_gelu_applies(x, fc1.weight, fc1.bias)
        )  # fmt: skip

    def make(attr_act: str):
        def make_forward(original):
            @replaces(original)
            def forward(self, hidden_state):
                act = getattr(self, attr_act)
                if not fused_applies(self.fc1, act, hidden_state):
                    return original(self, hidden_state)
                return self.fc2(linear_gelu(hidden_state, self.fc1.weight, self.fc1.bias))

            return forward

        return make_forward

    return [
        class_patch(mods[VJEPA2].VJEPA2MLP, "forward", make("activation")),
        class_patch(mods[IJEPA].IJepaMLP, "forward", make("activation_fn")),
    ]


# -- public API ---------------------------------------------------------------------------


def apply(
    *, apply_masks: bool = True, rope: bool = True, predictor: bool = True, patch_embed: bool = True, mlp: bool = True
) -> list[str]:
    """Patch transformers' V-JEPA 2 and I-JEPA models; returns what was patched (``module.attr``).

    Imports the two modelling modules (transformers is imported here, not by ``import
    fastjepa``). Refuses (:class:`~fastjepa.integrations._patching.CodebaseMismatch`)
    another transformers version or classes of other signatures. Calling it again first
    reverts the previous call.
    """
    mods = _identify()
    chosen = [(apply_masks, _apply_masks), (rope, _rope), (predictor, _predictor), (patch_embed, _patch_embed), (mlp, _mlp)]
    return _STATE.apply_providers(mods, chosen)


def revert() -> list[str]:
    """Put every object :func:`apply` replaced back (the very same objects)."""
    return _STATE.revert()


def patched() -> list[str]:
    """What is patched now."""
    return _STATE.patched()

