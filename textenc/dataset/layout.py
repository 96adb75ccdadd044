"""How one caption's encoding is stored: CLIP windows, and a T5 sequence where the family has one.

SD1, SD2 and SDXL store their cond as whole 77-token windows (``cond``, counted by
``window_offsets``). A family with a T5 role (SD3, Flux, Wan) stores

* the CLIP rows of its cond (SD3's L ‖ G windows; none for Flux and Wan) in ``cond``,
  at their own width (SD3 2048): ComfyUI's zero padding to T5's width is not stored;
* the T5 rows in ``t5``, each caption at its own length (``t5_offsets``): the family's
  minimum (SD3 77, Flux 256, Wan 512) or the caption's token count where longer, so no
  caption carries padding beyond that minimum;
* ``t5_tokens``: its real T5 tokens (through ``</s>``; the attention mask's ones), and
  ``clip_tokens``: its first CLIP window's real tokens (start, text, end), for the
  masks trainers read.

Reading joins the parts back into ComfyUI's cond, bit for bit (the dropped columns are
checked to be zeros when the caption is stored).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import torch

from ..errors import DatasetError
from ..text_encoders.sequences import clip_real_length, real_length, sequence_length, t5_role

__all__ = ["Row", "Layout", "layout_for"]


class Row(NamedTuple):
    """One caption's stored encoding (tensors in the stored dtype)."""

    cond: torch.Tensor | None  # (77·windows, cond_width): CLIP rows; None where not stored
    pooled: torch.Tensor | None  # (pooled_width,); None: the family has no pooled output (Wan)
    windows: int  # CLIP windows in cond
    t5: torch.Tensor | None = None  # (T, t5_width): the T5 rows
    t5_tokens: int = 0
    clip_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Layout:
    """The storage shape of a run's captions (recorded in the manifest as ``layout``)."""

    sequence: bool  # a T5 sequence family (SD3, Flux, Wan)
    cond_width: int  # stored width of the CLIP rows; 0: the cond has none (Flux, Wan)
    pooled_width: int  # 0: no pooled output
    window_length: int = 77
    full_width: int = 0  # ComfyUI's cond width (SD3 4096); = cond_width for CLIP families
    t5_role: str | None = None
    t5_width: int = 0  # 0: no T5 loaded
    clip_role: str | None = None  # the CLIP role whose first window gives clip_tokens
    clip_end_token: int = 49407

    def manifest(self) -> dict[str, Any]:
        return {"kind": "sequence" if self.sequence else "windows", "cond_width": self.cond_width,
                "pooled_width": self.pooled_width, "window_length": self.window_length,
                "full_width": self.full_width, "t5_role": self.t5_role, "t5_width": self.t5_width,
                "clip_role": self.clip_role}

    def row(self, cond: torch.Tensor, pooled: torch.Tensor | None, tokens: Mapping[str, list],
            dtype: torch.dtype, *, want_cond: bool) -> Row:
        """ComfyUI's ``cond (T, D)`` and ``pooled (P,)`` of one caption → its :class:`Row`."""
        pooled_out = None if pooled is None or not self.pooled_width else pooled.to(dtype)
        if not self.sequence:
            return Row(cond.to(dtype) if want_cond else None, pooled_out, cond.shape[0] // self.window_length)
        t5_rows = sequence_length(tokens[self.t5_role]) if self.t5_width else 0
        clip_rows = cond.shape[0] - t5_rows
        clip_part = cond[:clip_rows]
        if self.cond_width < clip_part.shape[1] and bool(clip_part[:, self.cond_width:].any()):
            raise DatasetError(f"the CLIP rows of this {self.full_width}-wide cond are not zero past column "
                               f"{self.cond_width}; the encoders are not the set this run planned for")
        t5_tokens = real_length(tokens[self.t5_role][0]) if self.t5_width else 0
        clip_tokens = clip_real_length(tokens[self.clip_role][0], self.clip_end_token) if self.clip_role else 0
        return Row(clip_part[:, :self.cond_width].to(dtype) if want_cond and self.cond_width else None,
                   pooled_out, clip_rows // self.window_length,
                   cond[clip_rows:].to(dtype) if want_cond and self.t5_width else None, t5_tokens, clip_tokens)

    def join(self, cond: torch.Tensor | None, t5: torch.Tensor | None) -> torch.Tensor | None:
        """The stored parts of one caption → ComfyUI's cond ``(T, full_width)``."""
        if not self.sequence:
            return cond
        parts = []
        if cond is not None and cond.shape[0]:
            parts.append(torch.nn.functional.pad(cond, (0, self.full_width - cond.shape[1])))
        if t5 is not None:
            parts.append(t5)
        if not parts:
            return None
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _clip_width(clip, family, t5_name: str | None) -> int:
    """Stored width of the CLIP rows: the loaded CLIP encoders' widths side by side when the
    family's every CLIP role is loaded; otherwise the full width (nothing is dropped)."""
    encoders = clip.cond_stage_model.encoders
    clip_roles = [role.name for role in family.roles if role.name != t5_name]
    if all(name in encoders for name in clip_roles):
        return sum(encoders[name].config.hidden_size for name in clip_roles)
    return 0


def layout_for(clip, empty_cond: torch.Tensor, empty_pooled: torch.Tensor | None,
               empty_tokens: Mapping[str, list]) -> Layout:
    """The layout of ``clip``'s family, from its empty caption's encoding ``(T, D)`` and tokens."""
    family = clip.family
    role = t5_role(family)
    pooled_width = 0 if empty_pooled is None else int(empty_pooled.shape[-1])
    if role is None:
        return Layout(False, int(empty_cond.shape[-1]), pooled_width, window_length=77,
                      full_width=int(empty_cond.shape[-1]))
    encoders = clip.cond_stage_model.encoders
    t5_width = int(empty_cond.shape[-1]) if role.name in encoders else 0
    t5_rows = sequence_length(empty_tokens[role.name]) if t5_width else 0
    full_width = int(empty_cond.shape[-1])
    clip_rows = int(empty_cond.shape[0]) - t5_rows
    cond_width = (_clip_width(clip, family, role.name) or full_width) if clip_rows else 0
    clip_roles = [name for name in encoders if name != role.name]
    clip_role = clip_roles[0] if clip_roles else None
    end_token = encoders[clip_role].special_tokens.get("end", 49407) if clip_role else 49407
    return Layout(True, cond_width, pooled_width, 77, full_width, role.name, t5_width, clip_role, end_token)
