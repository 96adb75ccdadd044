"""Encode nodes with one prompt per text encoder: SD3 (``clip_l``, ``clip_g``, ``t5xxl``) and
Flux (``clip_l``, ``t5xxl``, ``guidance``), with the sockets and graph rules of ComfyUI's
``CLIPTextEncodeSD3`` (comfy_extras/nodes_sd3.py) and ``CLIPTextEncodeFlux``
(comfy_extras/nodes_flux.py). The encoding is the library's (the CLIP's family).
"""

from __future__ import annotations

from typing import Any

from .text_encode import CLIP_INPUT, pad_to_same_windows, require_roles, text_input
from .validate import checked

#: ComfyUI's ``empty_padding`` choices: "none" leaves an empty prompt's part without tokens.
EMPTY_PADDING = ["none", "empty_prompt"]
#: ``guidance`` as ComfyUI's Flux nodes declare it.
GUIDANCE_INPUT = ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                            "tooltip": "Flux's distilled guidance, carried in the conditioning as "
                                       "\"guidance\" (the sampler's model reads it; CFG is separate)."})


def sd3_tokens(clip: Any, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str) -> dict:
    """The tokens of ComfyUI's ``CLIPTextEncodeSD3``: each part's own prompt; with
    ``empty_padding="none"`` an empty prompt's part gets no tokens (its encoder is skipped:
    both CLIP parts empty leave only T5, an empty T5 part is its end token alone);
    then the shorter of ``l`` / ``g`` is padded with empty-prompt windows."""
    no_padding = empty_padding == "none"
    tokens = dict(clip.tokenize(clip_g))
    if not clip_g and no_padding:
        tokens["g"] = []
    tokens["l"] = [] if not clip_l and no_padding else clip.tokenize(clip_l)["l"]
    tokens["t5xxl"] = [] if not t5xxl and no_padding else clip.tokenize(t5xxl)["t5xxl"]
    if len(tokens["l"]) != len(tokens["g"]):
        tokens.update(pad_to_same_windows(tokens, clip.tokenize("")))
    return tokens


class CLIPTextEncodeSD3:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": CLIP_INPUT,
            "clip_l": text_input("Prompt for the CLIP-L encoder."),
            "clip_g": text_input("Prompt for the CLIP-G (OpenCLIP bigG) encoder."),
            "t5xxl": text_input("Prompt for the T5-XXL encoder."),
            "empty_padding": (EMPTY_PADDING, {"default": "none",
                              "tooltip": "none: an empty prompt leaves its encoder out (no tokens); "
                                         "empty_prompt: it is encoded as the empty prompt."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("SD3 conditioning: CLIP-L and CLIP-G side by side, then T5, with the pooled output.",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = ("Encodes one prompt per SD3 / SD3.5 text encoder (CLIP-L, CLIP-G, T5-XXL); the shorter "
                   "CLIP token list is padded with empty-prompt windows, as ComfyUI's CLIPTextEncodeSD3.")

    @checked
    def encode(self, clip, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str):
        require_roles("CLIPTextEncodeSD3", clip, ("l", "g", "t5xxl"))
        return (clip.encode_from_tokens_scheduled(sd3_tokens(clip, clip_l, clip_g, t5xxl, empty_padding)),)


class CLIPTextEncodeFlux:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": CLIP_INPUT,
            "clip_l": text_input("Prompt for the CLIP-L encoder (Flux's pooled output)."),
            "t5xxl": text_input("Prompt for the T5-XXL encoder (Flux's cond)."),
            "guidance": GUIDANCE_INPUT}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Flux conditioning: T5's cond, CLIP-L's pooled output and the guidance.",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning/flux"
    DESCRIPTION = ("Encodes one prompt per Flux text encoder (CLIP-L for the pooled output, T5-XXL for the "
                   "cond) and sets the guidance, as ComfyUI's CLIPTextEncodeFlux.")

    @checked
    def encode(self, clip, clip_l: str, t5xxl: str, guidance: float):
        require_roles("CLIPTextEncodeFlux", clip, ("l", "t5xxl"))
        tokens = dict(clip.tokenize(clip_l))
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        return (clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance}),)
