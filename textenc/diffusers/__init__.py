"""diffusers pipelines (SD1/SD2/SDXL, SD3, Flux, Wan): their text encoders as a textenc ``CLIP``,
and ComfyUI-style conditioning handed back as the pipeline's keyword arguments.

>>> # pipe = StableDiffusionPipeline.from_pretrained("some/sd15-folder")
>>> # kwargs = encode_for_pipeline(pipe, "a (red fox:1.2) in the snow", "blurry")
>>> # image = pipe(**kwargs, num_inference_steps=30).images[0]

Kind (documented in README, "Using textenc with diffusers"): ``StableDiffusionXL*Pipeline`` → SDXL;
any other ``StableDiffusion*Pipeline`` (not SD3) → SD2 when its text encoder's
``hidden_act`` is ``gelu`` (OpenCLIP ViT-H), else SD1 (OpenAI CLIP-L, ``quick_gelu``).
Padding always follows the pipeline's own tokenizer ``pad_token``.
``StableDiffusion3*Pipeline`` → SD3, ``Flux*Pipeline`` → Flux, ``Wan*Pipeline`` → Wan
(docs/diffusers.md, "SD3, Flux and Wan pipelines").

diffusers is never imported: a pipeline is read through its attributes, no
transformers model is run, and its weights are shared, not copied.

The code lives in :mod:`textenc.diffusers.load` (folders and pipeline objects
→ ``CLIP``) and :mod:`textenc.diffusers.encode` (prompts or conditioning →
pipeline keyword arguments); this module is the public entry point.
"""

from __future__ import annotations

from .encode import encode_for_pipeline, to_diffusers
from .load import KINDS, load_from_diffusers, pipeline_kind
# Module constants that lived here before the split, kept importable from here.
from .encode import CACHE_ATTRIBUTE  # noqa: F401
from .load import HF_CLIP_TEXT_DEFAULTS, SHARD_INDEXES, WEIGHT_FILES  # noqa: F401

__all__ = ["KINDS", "load_from_diffusers", "encode_for_pipeline", "to_diffusers", "pipeline_kind"]
