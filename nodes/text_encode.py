"""Text encoding nodes: clip skip, prompt encode, SDXL encode, advanced encode."""

from __future__ import annotations

from typing import Any

from .validate import checked

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
WEIGHT_INTERPRETATIONS = ["auto", "comfy", "a1111", "a1111_no_norm", "compel", "none"]
TOKEN_NORMALIZATIONS = ["none", "mean", "length", "length+mean"]
WEIGHT_CONVENTIONS = ["comfy", "a1111"]
#: The advanced node's syntax refinements at their defaults (plain ComfyUI syntax).
COMFY_REFINEMENTS = {"weight_convention": "comfy", "square_brackets": False, "break_keyword": False}


def text_input(tooltip: str, default: str = "") -> tuple:
    """A multiline prompt input with dynamic prompts, as ComfyUI's text inputs (shared with
    the vision nodes)."""
    return ("STRING", {"multiline": True, "dynamicPrompts": True, "default": default, "tooltip": tooltip})


CLIP_INPUT = ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})


def require_roles(node: str, clip: Any, roles: tuple[str, ...]) -> None:
    """A node that fills the tokens of ``roles`` itself needs a CLIP of exactly those roles
    (its family's, from the registry): another CLIP would miss a part or be given tokens
    it has no encoder for.

    Raises:
        CheckpointError: naming the node, the roles wanted and the CLIP's family and roles.
    """
    from textenc.errors import CheckpointError

    family = clip.family
    if set(family.role_names) != set(roles):
        raise CheckpointError(f"{node}: clip must have the text encoders {' + '.join(roles)}, got a "
                              f"{family.label} CLIP ({' + '.join(family.role_names)}); load one with the "
                              "matching loader type or use CLIP Text Encode (textenc)")


def _check_layer_depth(clip: Any, layer: int) -> None:
    """``layer`` must exist in each of the CLIP's text encoders (SDXL: clip_l and clip_g),
    in ComfyUI's numbering (diffusers' 23-layer SD2 counts as ViT-H's 24 layers)."""
    from textenc.errors import LayerError

    try:
        clip.check_layer(layer)
    except LayerError as exc:
        raise LayerError(f"CLIPSetLastLayer: stop_at_clip_layer={layer}: {exc}") from None


class CLIPSetLastLayer:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP", {"tooltip": "The CLIP model to change."}),
            "stop_at_clip_layer": ("INT", {"default": -1, "min": -24, "max": -1, "step": 1,
                                           "tooltip": "Last layer used: -1 the final layer, -2 the one "
                                                      "before (A1111's clip skip 2), ..."})}}

    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("A copy of the CLIP that stops at the chosen layer.",)
    FUNCTION = "set_last_layer"
    CATEGORY = "conditioning"
    DESCRIPTION = "Sets the CLIP layer whose output is used (clip skip); the input CLIP is not changed."

    @checked
    def set_last_layer(self, clip, stop_at_clip_layer: int):
        _check_layer_depth(clip, stop_at_clip_layer)
        clip = clip.clone()
        clip.clip_layer(stop_at_clip_layer)
        return (clip,)


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": text_input("The text to be encoded."), "clip": CLIP_INPUT}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide "
                   "the diffusion model towards generating specific images.")

    @checked
    def encode(self, clip, text: str):
        return (clip.encode_from_tokens_scheduled(clip.tokenize(text)),)


def pad_to_same_windows(tokens: dict, empty: dict) -> dict:
    """Append empty-prompt windows to the shorter of ``l``/``g`` (ComfyUI's CLIPTextEncodeSDXL)."""
    tokens = {"g": list(tokens["g"]), "l": list(tokens["l"])}
    while len(tokens["l"]) < len(tokens["g"]):
        tokens["l"] += empty["l"]
    while len(tokens["g"]) < len(tokens["l"]):
        tokens["g"] += empty["g"]
    return tokens


class CLIPTextEncodeSDXL:
    @classmethod
    def INPUT_TYPES(cls):
        def size(default: int, tooltip: str) -> tuple:
            return ("INT", {"default": default, "min": 0, "max": MAX_RESOLUTION, "tooltip": tooltip})

        return {"required": {
            "clip": CLIP_INPUT,
            "width": size(1024, "Original image width the model is told (SDXL size conditioning)."),
            "height": size(1024, "Original image height the model is told."),
            "crop_w": size(0, "Left crop offset the model is told."),
            "crop_h": size(0, "Top crop offset the model is told."),
            "target_width": size(1024, "Target image width the model is told."),
            "target_height": size(1024, "Target image height the model is told."),
            "text_g": text_input("Prompt for the CLIP-G (OpenCLIP bigG) encoder."),
            "text_l": text_input("Prompt for the CLIP-L encoder.")}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("SDXL conditioning with pooled output and size conditioning.",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = ("Encodes separate prompts for SDXL's two text encoders and attaches the size and crop "
                   "conditioning; the shorter token list is padded with empty-prompt windows.")

    @checked
    def encode(self, clip, width: int, height: int, crop_w: int, crop_h: int, target_width: int,
               target_height: int, text_g: str, text_l: str):
        require_roles("CLIPTextEncodeSDXL", clip, ("l", "g"))
        tokens = {"g": clip.tokenize(text_g)["g"], "l": clip.tokenize(text_l)["l"]}
        tokens = pad_to_same_windows(tokens, clip.tokenize(""))
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                 "target_width": target_width, "target_height": target_height}
        return ([[cond, {**extras, **sizes}] for cond, extras in conditioning],)


def _syntaxes() -> list[str]:
    from textenc.prompts.dialects import SYNTAXES

    return list(SYNTAXES)


class CLIPTextEncodeAdvancedTextenc:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": text_input("The text to be encoded."),
            "clip": CLIP_INPUT,
            "token_normalization": (TOKEN_NORMALIZATIONS, {"default": "none",
                                    "tooltip": "Rescale weights per word: mean (average weight 1), length "
                                               "(spread over the word's tokens), or both."}),
            "weight_interpretation": (WEIGHT_INTERPRETATIONS, {"default": "auto",
                                      "tooltip": "How weights change the embedding: auto (the syntax's own: "
                                                 "comfy for comfy, a1111 for a1111), comfy (towards the "
                                                 "empty prompt), a1111 (scale, then restore the mean), "
                                                 "a1111_no_norm, compel, none (ignore weights)."}),
            "weight_convention": (WEIGHT_CONVENTIONS, {"default": "comfy",
                                  "tooltip": "Syntax comfy only: (x:w) replaces the outer weight (comfy) "
                                             "or multiplies it (a1111)."}),
            "square_brackets": ("BOOLEAN", {"default": False,
                                "tooltip": "Syntax comfy only: read [x] as down-weighting by 1/1.1 (A1111)."}),
            "break_keyword": ("BOOLEAN", {"default": False,
                              "tooltip": "Syntax comfy only: read a standalone BREAK as the start of a new "
                                         "77-token window."})},
            "optional": {
            "syntax": (_syntaxes(), {"default": "comfy",
                       "tooltip": "Prompt dialect: comfy (ComfyUI's), a1111 (A1111's weights, [x] and "
                                  "BREAK), ... The three options above refine comfy only."}),
            "truncate_long_prompts": ("BOOLEAN", {"default": True,
                                      "tooltip": "Syntax compel only, as compel's option of that name: on "
                                                 "keeps the first 75 tokens (one window); off cuts a longer "
                                                 "prompt into compel's 77-token chunks."}),
            "fast_pooled": ("BOOLEAN", {"default": False,
                            "tooltip": "At an intermediate layer (clip skip; SD2 and SDXL by default), run "
                                       "the layers after it for the pooled output's token only: faster, and "
                                       "the pooled output then differs from ComfyUI's by fp32 rounding "
                                       "(at most 2.5e-6). Off: ComfyUI's bits."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning/advanced"
    DESCRIPTION = ("Encodes a prompt with a choice of prompt syntax (comfy, a1111, ...), weight "
                   "interpretation and token normalization.")

    @checked
    def encode(self, clip, text: str, token_normalization: str = "none", weight_interpretation: str = "auto",
               weight_convention: str = "comfy", square_brackets: bool = False, break_keyword: bool = False,
               syntax: str = "comfy", truncate_long_prompts: bool = True, fast_pooled: bool = False):
        from textenc.prompts.dialects import (DEFAULT_SYNTAX, check_refinements, default_weight_mode, dialect_options)
        from textenc.errors import PromptError

        refinements = {"weight_convention": weight_convention, "square_brackets": square_brackets,
                       "break_keyword": break_keyword}
        try:
            check_refinements(syntax, refinements)
            refinements.update(dialect_options(syntax, {"truncate_long_prompts": truncate_long_prompts}))
        except PromptError as exc:
            raise PromptError(f"CLIPTextEncodeAdvancedTextenc: {exc}") from None
        if syntax != DEFAULT_SYNTAX:  # comfy's refinements, at their defaults: not passed on
            refinements = {k: v for k, v in refinements.items() if k not in COMFY_REFINEMENTS}
        # Per-call syntax options: the shared tokenizer is not changed.
        tokens = clip.tokenizer.tokenize_with_weights(text, True, syntax=syntax, **refinements)
        if weight_interpretation == "auto":
            weight_interpretation = default_weight_mode(syntax)
        options = {"weight_mode": weight_interpretation, "normalization": token_normalization}
        if fast_pooled:
            options["fast_pooled"] = True
        return (clip.encode_from_tokens_scheduled(tokens, options=options),)
