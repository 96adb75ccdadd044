"""compel in one import: its dialect and its weight mode, as ``textenc.dialects.compel`` offered.

Before the subpackages, ``textenc.dialects.compel`` held both compel's prompt
reading and its weighting helpers (the README's
``from textenc.dialects.compel import empty_conditioning,
pad_conditioning_tensors_to_same_length``). The reading now lives in
:mod:`textenc.prompts.dialects.compel` and the weighting in
:mod:`textenc.text_encoders.weighting.compel` (prompts/ never imports model
code); this module, above both, is where the old name points
(:mod:`textenc._aliases`), so old imports keep working.
"""

from __future__ import annotations

from ..prompts.dialects.compel import DIALECT, CompelDialect, CompelTag, CompelToken, parse_compel
from .weighting.compel import (COMPEL_MIN_WEIGHT, empty_conditioning, encode_compel, lerp_weight,
                               pad_conditioning_tensors_to_same_length)

__all__ = ["DIALECT", "CompelDialect", "CompelTag", "CompelToken", "COMPEL_MIN_WEIGHT", "parse_compel",
           "encode_compel", "lerp_weight", "pad_conditioning_tensors_to_same_length", "empty_conditioning"]
