"""Text encoding nodes: clip skip, prompt encode, SDXL encode, advanced encode."""

from __future__ import annotations

from typing import Any

MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION
WEIGHT_INTERPRETATIONS = ["comfy", "a1111", "a1111_no_norm", "compel", "none"]
TOKEN_NORMALIZATIONS = ["none", "mean", "length", "length+mean"]
WEIGHT_CONVENTIONS = ["comfy", "a1111"]


def _text_input(tooltip: str, default: str = "") -> tuple:
    return ("STRING", {"multiline": True, "dynamicPrompts": True, "default": default, "tooltip": tooltip})


CLIP_INPUT = ("CLIP", {"tooltip": "The CLIP model used for encoding the text."})


def _require_clip(clip: Any) -> None:
    if clip is None:
        from textenc.errors import CheckpointError

        raise CheckpointError("clip input is None: the checkpoint or loader gave no text encoder; "
                              "connect a CLIP loader")


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

    def set_last_layer(self, clip, stop_at_clip_layer: int):
        _require_clip(clip)
        clip = clip.clone()
        clip.clip_layer(stop_at_clip_layer)
        return (clip,)


class CLIPTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": _text_input("The text to be encoded."), "clip": CLIP_INPUT}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text used to guide the diffusion model.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = ("Encodes a text prompt using a CLIP model into an embedding that can be used to guide "
                   "the diffusion model towards generating specific images.")

    def encode(self, clip, text: str):
        _require_clip(clip)
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
            "text_g": _text_input("Prompt for the CLIP-G (OpenCLIP bigG) encoder."),
            "text_l": _text_input("Prompt for the CLIP-L encoder.")}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("SDXL conditioning with pooled output and size conditioning.",)
    FUNCTION = "encode"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = ("Encodes separate prompts for SDXL's two text encoders and attaches the size and crop "
                   "conditioning; the shorter token list is padded with empty-prompt windows.")

    def encode(self, clip, width: int, height: int, crop_w: int, crop_h: int, target_width: int,
               target_height: int, text_g: str, text_l: str):
        from textenc.errors import CheckpointError

        _require_clip(clip)
        clip_type = getattr(clip, "clip_type", None)  # None: a CLIP not loaded by textenc
        if clip_type != "sdxl":
            raise CheckpointError(f"CLIPTextEncodeSDXL needs an SDXL CLIP (l + g), got {clip_type!r}")
        tokens = {"g": clip.tokenize(text_g)["g"], "l": clip.tokenize(text_l)["l"]}
        tokens = pad_to_same_windows(tokens, clip.tokenize(""))
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        sizes = {"width": width, "height": height, "crop_w": crop_w, "crop_h": crop_h,
                 "target_width": target_width, "target_height": target_height}
        return ([[cond, {**extras, **sizes}] for cond, extras in conditioning],)


class CLIPTextEncodeAdvancedTextenc:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text": _text_input("The text to be encoded."),
            "clip": CLIP_INPUT,
            "token_normalization": (TOKEN_NORMALIZATIONS, {"default": "none",
                                    "tooltip": "Rescale weights per word: mean (average weight 1), length "
                                               "(spread over the word's tokens), or both."}),
            "weight_interpretation": (WEIGHT_INTERPRETATIONS, {"default": "comfy",
                                      "tooltip": "How weights change the embedding: comfy (towards the empty "
                                                 "prompt), a1111 (scale, then restore the mean), "
                                                 "a1111_no_norm, compel, none (ignore weights)."}),
            "weight_convention": (WEIGHT_CONVENTIONS, {"default": "comfy",
                                  "tooltip": "comfy: (x:w) replaces the outer weight; a1111: it multiplies it."}),
            "square_brackets": ("BOOLEAN", {"default": False,
                                "tooltip": "Read [x] as down-weighting by 1/1.1 (A1111)."}),
            "break_keyword": ("BOOLEAN", {"default": False,
                              "tooltip": "Read a standalone BREAK as the start of a new 77-token window."})}}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("A conditioning containing the embedded text.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning/advanced"
    DESCRIPTION = ("Encodes a prompt with a choice of weight interpretation, token normalization and prompt "
                   "syntax (A1111 weights, square brackets, BREAK).")

    def encode(self, clip, text: str, token_normalization: str = "none", weight_interpretation: str = "comfy",
               weight_convention: str = "comfy", square_brackets: bool = False, break_keyword: bool = False):
        _require_clip(clip)
        from textenc.errors import CheckpointError
        from textenc.sd import CLIP

        if not isinstance(clip, CLIP):
            raise CheckpointError(f"CLIPTextEncodeAdvancedTextenc needs a CLIP loaded by textenc's loaders, "
                                  f"got {type(clip).__module__}.{type(clip).__name__}")
        # Per-call syntax options: the shared tokenizer is not changed.
        tokens = clip.tokenizer.tokenize_with_weights(text, True, weight_convention=weight_convention,
                                                      square_brackets=bool(square_brackets),
                                                      break_keyword=bool(break_keyword))
        options = {"weight_mode": weight_interpretation, "normalization": token_normalization}
        return (clip.encode_from_tokens_scheduled(tokens, options=options),)
