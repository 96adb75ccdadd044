"""CONDITIONING nodes: concat, combine, average, zero out, unCLIP, Flux guidance (:mod:`textenc.conditioning`)."""

from __future__ import annotations

from .validate import checked

CATEGORY = "conditioning"


def _cond(tooltip: str) -> tuple:
    return ("CONDITIONING", {"tooltip": tooltip})


class ConditioningConcat:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_to": _cond("Conditioning that gets the tokens appended."),
                             "conditioning_from": _cond("Conditioning whose first entry is appended.")}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "concat"
    CATEGORY = CATEGORY
    DESCRIPTION = "Appends the tokens of conditioning_from to every entry of conditioning_to."

    @checked
    def concat(self, conditioning_to, conditioning_from):
        from textenc.conditioning import conditioning_concat

        return (conditioning_concat(conditioning_to, conditioning_from),)


class ConditioningCombine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning_1": _cond("First conditioning."),
                             "conditioning_2": _cond("Second conditioning.")}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "combine"
    CATEGORY = CATEGORY
    DESCRIPTION = "Combines two conditionings into one list; the sampler uses both."

    @checked
    def combine(self, conditioning_1, conditioning_2):
        from textenc.conditioning import conditioning_combine

        return (conditioning_combine(conditioning_1, conditioning_2),)


class ConditioningAverage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning_to": _cond("Conditioning kept at conditioning_to_strength."),
            "conditioning_from": _cond("Conditioning blended in at 1 - conditioning_to_strength."),
            "conditioning_to_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                   "tooltip": "Weight of conditioning_to."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "addWeighted"
    CATEGORY = CATEGORY
    DESCRIPTION = "Blends two conditionings: to * strength + from * (1 - strength), pooled outputs too."

    @checked
    def addWeighted(self, conditioning_to, conditioning_from, conditioning_to_strength: float):
        from textenc.conditioning import conditioning_average

        return (conditioning_average(conditioning_to, conditioning_from, conditioning_to_strength),)


class ConditioningZeroOut:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": _cond("Conditioning to replace with zeros.")}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "zero_out"
    CATEGORY = "advanced/conditioning"
    DESCRIPTION = "Replaces every cond and pooled output with zeros of the same shape."

    @checked
    def zero_out(self, conditioning):
        from textenc.conditioning import conditioning_zero_out

        return (conditioning_zero_out(conditioning),)


class unCLIPConditioning:  # noqa: N801 - ComfyUI's node name
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": _cond("Conditioning to attach the image embedding to."),
            "clip_vision_output": ("CLIP_VISION_OUTPUT", {"tooltip": "Output of CLIP Vision Encode."}),
            "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                                   "tooltip": "Weight of the image embedding; 0 disables it."}),
            "noise_augmentation": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Noise the unCLIP model adds to the embedding."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_adm"
    CATEGORY = CATEGORY
    DESCRIPTION = "Adds a CLIP vision embedding to the conditioning for unCLIP models."

    @checked
    def apply_adm(self, conditioning, clip_vision_output, strength: float, noise_augmentation: float):
        from textenc.conditioning import unclip_conditioning

        return (unclip_conditioning(conditioning, clip_vision_output, strength, noise_augmentation),)


class FluxGuidance:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "conditioning": _cond("Conditioning to set the guidance of."),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "Flux's distilled guidance (replaces the one already set)."})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "append"
    CATEGORY = "advanced/conditioning/flux"
    DESCRIPTION = "Sets \"guidance\" in every entry of the conditioning, as ComfyUI's FluxGuidance."

    @checked
    def append(self, conditioning, guidance: float):
        from textenc.conditioning import conditioning_set_values

        return (conditioning_set_values(conditioning, {"guidance": guidance}),)
