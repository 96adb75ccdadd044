"""PhotoMaker v1 ID encoder and the prompt step that uses it.

PhotoMaker (TencentARC, https://github.com/TencentARC/PhotoMaker) encodes one
or more photos of a person with a CLIP ViT-L/14 vision tower, projects the
pooled class token twice (768 + 1280 = 2048, SDXL's prompt width) and fuses the
result into the prompt embedding of the *class word* ("man", "woman", ...)
written right before a trigger word. Attribute names follow PhotoMaker's
checkpoint (``vision_model``, ``visual_projection``, ``visual_projection_2``,
``fuse_module.mlp1.layernorm`` ...) so its ``id_encoder`` weights load as they are.

>>> window = [(49406, 1.0), (7, 1.0), (9, 1.0), (8, 1.0), (49407, 1.0), (49407, 1.0)]
>>> new, position = apply_trigger(window, [9], num_images=2)
>>> [token for token, _ in new], position
([49406, 7, 7, 8, 49407, 49407], 1)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..nn import ops
from ..loading.checkpoint import aligned, load_state_dict
from ..nn.clip_model import CLIPVisionModelProjection
from .clip_vision import check_state_dict, clip_preprocess
from ..nn.config import CLIPVisionConfig
from ..errors import CheckpointError, ConfigError, PromptError

__all__ = ["MLP", "FuseModule", "PhotoMakerIDEncoder", "photomaker_state_dict",
           "load_photomaker", "special_token_ids", "trigger_token_ids", "apply_trigger", "encode_photomaker"]


class MLP(torch.nn.Module):
    """layernorm -> fc1 -> GELU -> fc2, plus the input when ``use_residual``."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, *, use_residual: bool = True,
                 dtype=None, device=None, operations=ops.disable_weight_init) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ConfigError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = operations.LayerNorm(in_dim, dtype=dtype, device=device)
        self.fc1 = operations.Linear(in_dim, hidden_dim, dtype=dtype, device=device)
        self.fc2 = operations.Linear(hidden_dim, out_dim, dtype=dtype, device=device)
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.nn.functional.gelu(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FuseModule(torch.nn.Module):
    """Fuses ID embeddings into class-word prompt embeddings (PhotoMaker ``FuseModule``)."""

    def __init__(self, embed_dim: int = 2048, *, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False,
                        dtype=dtype, device=device, operations=operations)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True,
                        dtype=dtype, device=device, operations=operations)
        self.layer_norm = operations.LayerNorm(embed_dim, dtype=dtype, device=device)

    def fuse_fn(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        # prompt_embeds, id_embeds: (N, D) -> (N, D)
        x = self.mlp1(torch.cat([prompt_embeds, id_embeds], dim=-1)) + prompt_embeds
        return self.layer_norm(self.mlp2(x))

    def forward(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """Replace the masked prompt rows by fused ID embeddings; returns a new tensor.

        Args:
            prompt_embeds: (B, T, D).
            id_embeds: (B, N, 1, D), N images per row; row b uses its first
                ``class_tokens_mask[b].sum()`` images, in order.
            class_tokens_mask: (B, T) bool.
        """
        batch, images = id_embeds.shape[:2]
        counts = class_tokens_mask.sum(dim=1)  # (B,)
        if bool((counts > images).any()):
            raise PromptError(f"class-token mask marks {counts.tolist()} positions per prompt "
                              f"but only {images} ID image(s) were given")
        valid = torch.arange(images, device=counts.device)[None, :] < counts[:, None]  # (B, N)
        ids = id_embeds.reshape(batch * images, -1)[valid.flatten()].to(prompt_embeds.dtype)
        fused = self.fuse_fn(prompt_embeds[class_tokens_mask], ids)  # (sum(counts), D)
        return prompt_embeds.masked_scatter(class_tokens_mask[..., None], fused.to(prompt_embeds.dtype))


class PhotoMakerIDEncoder(CLIPVisionModelProjection):
    """CLIP vision tower + two projections + :class:`FuseModule` (PhotoMaker v1).

    Args:
        vision_config: The vision tower (PhotoMaker uses OpenAI ViT-L/14).
        projection_2_dim: Width of ``visual_projection_2`` (1280, CLIP-G's width).
        embed_dim: Fuse width; must equal ``projection_dim + projection_2_dim``.
    """

    def __init__(self, vision_config: str | Mapping | CLIPVisionConfig = "clip_vision_config_vitl", *,
                 projection_2_dim: int = 1280, embed_dim: int = 2048, dtype=None, device=None,
                 operations=ops.disable_weight_init) -> None:
        super().__init__(vision_config, dtype, device, operations)
        if self.config.projection_dim + projection_2_dim != embed_dim:
            raise ConfigError(f"projection_dim {self.config.projection_dim} + projection_2_dim "
                              f"{projection_2_dim} must equal embed_dim {embed_dim}")
        self.visual_projection_2 = operations.Linear(self.config.hidden_size, projection_2_dim,
                                                     bias=False, dtype=dtype, device=device)
        self.fuse_module = FuseModule(embed_dim, dtype=dtype, device=device, operations=operations)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W) pixels, (B, T, D) prompt, (B, T) bool mask -> (B, T, D)."""
        batch, images = id_pixel_values.shape[:2]
        pooled = self.vision_model(id_pixel_values.flatten(0, 1))[2]  # (B·N, width)
        id_embeds = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
        return self.fuse_module(prompt_embeds, id_embeds.view(batch, images, 1, -1), class_tokens_mask)


def photomaker_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The ``id_encoder`` weights of a PhotoMaker checkpoint, nested or flattened.

    ``lora_weights`` are ignored on purpose: they are a LoRA for the SDXL UNet,
    applied by the LoRA loader, not part of the ID encoder.

    >>> photomaker_state_dict({"id_encoder.a": torch.zeros(1), "lora_weights.b": torch.zeros(1)})
    {'a': tensor([0.])}
    """
    nested = checkpoint.get("id_encoder")
    if isinstance(nested, Mapping):
        return dict(nested)
    flat = {key[len("id_encoder."):]: value for key, value in checkpoint.items()
            if key.startswith("id_encoder.")}
    if not flat:
        raise CheckpointError("not a PhotoMaker checkpoint: no 'id_encoder' weights "
                              f"(top-level keys start with {sorted({k.split('.')[0] for k in checkpoint})[:8]})")
    return flat


def load_photomaker(path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32,
                    compute_dtype: torch.dtype | None = None) -> PhotoMakerIDEncoder:
    """Load a PhotoMaker v1 ``.bin`` or ``.safetensors`` file, safely and strictly.

    Raises:
        CheckpointError: unreadable or unsafe file, not PhotoMaker, or keys that do not fit.
    """
    # PhotoMaker's .bin nests {"id_encoder": {...}, "lora_weights": {...}}.
    weights = photomaker_state_dict(load_state_dict(path, nested="flatten"))
    weights = {k: v for k, v in weights.items() if not k.endswith("position_ids")}
    operations = ops.pick_operations(dtype, compute_dtype or dtype)
    model = PhotoMakerIDEncoder(dtype=dtype, device="meta", operations=operations)
    expected = {key: value.shape for key, value in model.state_dict().items()}
    try:
        check_state_dict(expected, weights, what="PhotoMaker ID encoder")
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model.load_state_dict(aligned({k: v.to(device=device, dtype=dtype) for k, v in weights.items()}),
                          assign=True)
    return model.eval().requires_grad_(False)


def special_token_ids(clip: Any) -> dict[str, frozenset[int]]:
    """Per encoder, the ids in an empty prompt's window (start, end, padding)."""
    return {key: frozenset(entry[0] for entry in windows[0])
            for key, windows in clip.tokenize("").items()}


def trigger_token_ids(clip: Any, trigger_word: str) -> dict[str, list[int]]:
    """Token ids of ``trigger_word`` alone, per encoder, without special tokens."""
    special = special_token_ids(clip)
    result = {}
    for key, windows in clip.tokenize(trigger_word).items():
        result[key] = [entry[0] for entry in windows[0] if entry[0] not in special[key]]
        if not result[key]:
            raise PromptError(f"trigger word {trigger_word!r} tokenizes to nothing for {key!r}")
    return result


def apply_trigger(window: Sequence[tuple], trigger: Sequence[int], *, num_images: int,
                  special: frozenset[int] = frozenset()) -> tuple[list[tuple], int] | None:
    """Drop the first ``trigger`` token run from ``window`` and repeat the class token.

    The class token is the one right before the trigger (PhotoMaker marks a
    single token); it is repeated ``num_images`` times, one slot per ID image.
    The window keeps its length: it is padded with its last entry, or cut just
    before its last entry. Returns ``(new_window, class_position)`` or None when
    the trigger is absent.

    Raises:
        PromptError: the trigger has no (non-``special``) token before it.
    """
    tokens = [entry[0] for entry in window]
    width = len(trigger)
    start = next((i for i in range(len(tokens) - width + 1)
                  if tokens[i:i + width] == list(trigger)), None)
    if start is None:
        return None
    if start == 0 or tokens[start - 1] in special:
        raise PromptError("the trigger word needs a class word right before it "
                          "(e.g. 'a photo of a man photomaker')")
    position = start - 1
    new = list(window[:position]) + [window[position]] * num_images + list(window[start + width:])
    if len(new) < len(window):
        new += [window[-1]] * (len(window) - len(new))
    elif len(new) > len(window):
        new = new[:len(window) - 1] + [new[-1]]
    return new, position


def _mark_class_tokens(tokens: Mapping[str, list], trigger: Mapping[str, list[int]],
                       special: Mapping[str, frozenset[int]], num_images: int,
                       trigger_word: str) -> tuple[dict, list[int]]:
    out, positions = {}, set()
    for key, windows in tokens.items():
        out[key] = [list(w) for w in windows]
        for index, window in enumerate(windows):
            found = apply_trigger(window, trigger[key], num_images=num_images,
                                  special=special[key])
            if found is not None:
                out[key][index] = found[0]
                offset = index * len(window) + found[1]
                positions.add(tuple(range(offset, offset + num_images)))
                break
        else:
            raise PromptError(f"trigger word {trigger_word!r} is not in the prompt; write it "
                              "right after the class word, e.g. 'a photo of a man photomaker'")
    if len(positions) != 1:
        raise PromptError(f"the encoders put the class word at different positions {sorted(positions)}")
    return out, list(positions.pop())


def encode_photomaker(id_encoder: PhotoMakerIDEncoder, clip: Any, text: str, images: torch.Tensor,
                      *, trigger_word: str = "photomaker") -> list:
    """Encode ``text`` with ID images fused into the class word (ComfyUI ``PhotoMakerEncode``).

    Args:
        id_encoder: A loaded :class:`PhotoMakerIDEncoder`.
        clip: A ComfyUI-style CLIP (``tokenize``, ``encode_from_tokens``), SDXL
            for real PhotoMaker weights.
        text: The prompt, with ``trigger_word`` right after the class word.
        images: ComfyUI IMAGE [N, H, W, C]; each image takes one class-token slot.

    Returns:
        CONDITIONING ``[[cond (1, T, D), {"pooled_output": pooled}]]``.

    Raises:
        PromptError: trigger word missing or without a class word before it.
    """
    num_images = images.shape[0]
    trigger = trigger_token_ids(clip, trigger_word)
    tokens, positions = _mark_class_tokens(clip.tokenize(text), trigger, special_token_ids(clip),
                                           num_images, trigger_word)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    mask = torch.zeros(1, cond.shape[1], dtype=torch.bool, device=cond.device)
    mask[0, positions] = True
    config = id_encoder.config
    pixels = clip_preprocess(images, config.image_size, config.image_mean, config.image_std)
    weight = id_encoder.visual_projection.weight
    with torch.no_grad():
        out = id_encoder(pixels.to(device=weight.device, dtype=cond.dtype)[None],
                         cond.to(weight.device), mask.to(weight.device))
    return [[out.to(cond.device), {"pooled_output": pooled}]]
