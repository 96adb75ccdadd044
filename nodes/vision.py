"""Image nodes: CLIP vision encode and PhotoMaker encode."""

from __future__ import annotations

from .text_encode import text_input
from .validate import checked

CROP_MODES = {"center": True, "none": False}


class CLIPVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "The CLIP vision model."}),
            "image": ("IMAGE", {"tooltip": "Images to encode."}),
            "crop": (list(CROP_MODES), {"default": "center",
                     "tooltip": "center: resize and center-crop to a square; none: stretch to a square."})}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    OUTPUT_TOOLTIPS = ("Image embeddings and hidden states.",)
    FUNCTION = "encode"
    CATEGORY = "conditioning"
    DESCRIPTION = "Encodes images with a CLIP vision model (for unCLIP, style and IP-Adapter style nodes)."

    @checked
    def encode(self, clip_vision, image, crop: str = "center"):
        return (clip_vision.encode_image(image, crop=CROP_MODES[crop]),)


class PhotoMakerEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "photomaker": ("PHOTOMAKER", {"tooltip": "The PhotoMaker ID encoder."}),
            "image": ("IMAGE", {"tooltip": "Photos of the person; one class-word slot per image."}),
            "clip": ("CLIP", {"tooltip": "The (SDXL) CLIP model used for the prompt."}),
            "text": text_input("Prompt with the trigger word 'photomaker' right after the class word, "
                                "e.g. 'photo of a man photomaker'.", default="photograph of photomaker")}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "apply_photomaker"
    CATEGORY = "_for_testing/photomaker"
    DESCRIPTION = "Encodes the prompt and fuses the ID images into the class word before 'photomaker'."

    @checked
    def apply_photomaker(self, photomaker, image, clip, text: str):
        from textenc.vision.photomaker import encode_photomaker

        return (encode_photomaker(photomaker, clip, text, image),)
