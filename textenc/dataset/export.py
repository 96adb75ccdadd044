"""Export an encoded dataset folder in the forms trainers read: diffusers' pipeline
arguments and kohya sd-scripts' text-encoder caches.

Both read through :func:`textenc.dataset.format.open_captions`, so an unfinished folder
is refused unless ``allow_incomplete=True`` (then it warns).

kohya's caches, by family (names, shapes and dtypes as sd-scripts writes them:
``library/strategy_sdxl.py``, ``strategy_flux.py`` and ``strategy_sd3.py``, read at
kohya-ss/sd-scripts 48d368f; floats are float32, masks int64, flags numpy bools):

* SD1/SD2 ``{id}_te_outputs.npz``: ``hidden_state`` [T, D], ``pool`` [P];
* SDXL ``{id}_te_outputs.npz``: ``hidden_state1`` [T, 768], ``hidden_state2`` [T, 1280], ``pool2`` [1280];
* Flux ``{id}_flux_te.npz``: ``l_pooled`` [768], ``t5_out`` [T, 4096], ``txt_ids`` [T, 3] (zeros),
  ``t5_attn_mask`` [T], ``apply_t5_attn_mask`` (False: ComfyUI runs T5 unmasked);
* SD3 ``{id}_sd3_te.npz``: ``lg_out`` [77, 2048], ``lg_pooled`` [2048], ``t5_out`` [T, 4096],
  ``clip_l_attn_mask`` / ``clip_g_attn_mask`` [77], ``t5_attn_mask`` [T],
  ``apply_lg_attn_mask`` and ``apply_t5_attn_mask`` (both False).

``T`` is each caption's stored T5 length. sd-scripts pads every caption to one length
(``t5xxl_max_token_length``: Flux 512, schnell 256, SD3 256) and batches them, so encode
with ``t5_min_length`` set to that length for captions that fit it; a longer caption keeps
its full (ComfyUI) length, where sd-scripts would truncate.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import DatasetError
from .format import Caption, open_captions, read_manifest, write_safetensors

__all__ = ["export_diffusers", "export_kohya", "KOHYA_SUFFIXES"]

#: kohya sd-scripts' cache file suffix per family (its ``*_TEXT_ENCODER_OUTPUTS_NPZ_SUFFIX``).
KOHYA_SUFFIXES = {"sd1": "_te_outputs.npz", "sd2": "_te_outputs.npz", "sdxl": "_te_outputs.npz",
                  "flux": "_flux_te.npz", "sd3": "_sd3_te.npz"}


def _safe_stem(row_id: Any) -> str:
    stem = str(row_id)
    if stem.startswith("/") or ".." in Path(stem).parts:
        raise DatasetError(f"id {row_id!r} cannot be used as a file name")
    return stem


def _mask(ones: int, length: int) -> np.ndarray:
    """A tokenizer's attention mask: ``ones`` ones, then zeros, int64 (as ``return_tensors="pt"``)."""
    mask = np.zeros(length, dtype=np.int64)
    mask[:ones] = 1
    return mask


def _float(tensor: torch.Tensor) -> np.ndarray:
    return tensor.float().numpy()


def export_diffusers(folder: str | os.PathLike, out: str | os.PathLike, *, allow_incomplete: bool = False,
                     attention_mask: bool = False) -> int:
    """Write ``{out}/{id}.safetensors`` per caption with the pipeline's argument names:
    ``prompt_embeds`` [1, T, D] and, where the family has one, ``pooled_prompt_embeds``
    [1, P] (SD1/SD2/SDXL, SD3, Flux; Wan has none).

    ``prompt_embeds`` is ComfyUI's cond: SD3's CLIP rows (padded to 4096) then its T5
    rows, as ``StableDiffusion3Pipeline`` concatenates them; Flux's and Wan's T5 rows.
    ``attention_mask=True`` adds ``prompt_attention_mask`` [1, T] int64 for T5 families
    (1 for the real tokens; diffusers 0.42's SD3, Flux and Wan pipelines take none, so
    it is off by default). Returns the number of files written.
    """
    count = 0
    for caption in open_captions(folder, allow_incomplete=allow_incomplete):
        if caption.cond is None:
            raise DatasetError(f"{folder}: encoded with outputs=pooled; diffusers export needs cond")
        tensors = {"prompt_embeds": caption.cond.unsqueeze(0)}
        if caption.pooled is not None:
            tensors["pooled_prompt_embeds"] = caption.pooled.unsqueeze(0)
        if attention_mask and caption.t5 is not None:
            clip_rows = caption.cond.shape[0] - caption.t5.shape[0]
            mask = torch.zeros(1, caption.cond.shape[0], dtype=torch.int64)
            mask[0, :clip_rows + caption.t5_tokens] = 1
            tensors["prompt_attention_mask"] = mask
        target = Path(out) / f"{_safe_stem(caption.id)}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(target, tensors, {})
        count += 1
    return count


def _clip_arrays(caption: Caption, split: int | None) -> dict[str, np.ndarray]:
    if split is not None:
        arrays = {"pool2": _float(caption.pooled)}
        if caption.cond is not None:
            arrays.update(hidden_state1=_float(caption.cond[:, :split]), hidden_state2=_float(caption.cond[:, split:]))
        return arrays
    arrays = {"pool": _float(caption.pooled)}
    if caption.cond is not None:
        arrays["hidden_state"] = _float(caption.cond)
    return arrays


def _t5_part(caption: Caption, family: str) -> torch.Tensor:
    if caption.t5 is None:
        raise DatasetError(f"kohya's {family} cache needs T5's output: this folder was encoded without a T5 "
                           "text encoder or with outputs=pooled")
    return caption.t5


def _flux_arrays(caption: Caption) -> dict[str, np.ndarray]:
    t5 = _t5_part(caption, "Flux")
    return {"l_pooled": _float(caption.pooled), "t5_out": _float(t5),
            "txt_ids": np.zeros((t5.shape[0], 3), dtype=np.float32),
            "t5_attn_mask": _mask(caption.t5_tokens, t5.shape[0]), "apply_t5_attn_mask": np.bool_(False)}


def _clip_mask(caption: Caption, rows: int) -> np.ndarray:
    """1 for the first window's real tokens and every row of a later window (ComfyUI's windows)."""
    mask = np.ones(rows, dtype=np.int64)
    mask[caption.clip_tokens:min(rows, 77)] = 0
    return mask


def _sd3_arrays(caption: Caption) -> dict[str, np.ndarray]:
    t5 = _t5_part(caption, "SD3")
    if caption.clip is None or not caption.clip.shape[0]:
        raise DatasetError("kohya's SD3 cache needs CLIP-L and CLIP-G's output: this folder was encoded "
                           "without them")
    clip_mask = _clip_mask(caption, caption.clip.shape[0])
    return {"lg_out": _float(caption.clip), "lg_pooled": _float(caption.pooled), "t5_out": _float(t5),
            "clip_l_attn_mask": clip_mask, "clip_g_attn_mask": clip_mask.copy(),
            "t5_attn_mask": _mask(caption.t5_tokens, t5.shape[0]),
            "apply_lg_attn_mask": np.bool_(False), "apply_t5_attn_mask": np.bool_(False)}


def _kohya_writer(manifest: Mapping[str, Any]) -> Callable[[Caption], dict[str, np.ndarray]]:
    kind = manifest.get("kind")
    if kind == "flux":
        return _flux_arrays
    if kind == "sd3":
        return _sd3_arrays
    if kind not in KOHYA_SUFFIXES:
        raise DatasetError(f"kohya sd-scripts has no text-encoder cache for {kind!r} models; "
                           f"export_kohya writes {', '.join(KOHYA_SUFFIXES)}")
    split = manifest.get("widths", {}).get("l") if kind == "sdxl" else None
    return lambda caption: _clip_arrays(caption, split)


def export_kohya(folder: str | os.PathLike, out: str | os.PathLike, *, allow_incomplete: bool = False) -> int:
    """Write kohya sd-scripts' text-encoder cache ``{out}/{id}{suffix}`` per caption (see the
    module docstring for each family's file and keys). Returns the number of files written.

    Raises:
        DatasetError: a family sd-scripts has no cache for (Wan), or a folder missing the
            parts the cache needs (T5 for Flux and SD3, CLIP-L/G for SD3).
    """
    captions = open_captions(folder, allow_incomplete=allow_incomplete)  # checks the folder first
    manifest = read_manifest(folder) or {}
    arrays_for = _kohya_writer(manifest)
    suffix = KOHYA_SUFFIXES[manifest["kind"]]
    count = 0
    for caption in captions:
        target = Path(out) / f"{_safe_stem(caption.id)}{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.savez(target, **arrays_for(caption))
        count += 1
    return count
