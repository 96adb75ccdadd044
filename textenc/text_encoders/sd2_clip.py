"""SD2 text encoder (OpenCLIP ViT-H/14): a thin subclass that only changes parameters.

Penultimate layer with the final layer norm, padding with token 0 (``!``),
width 1024, projected pooled output — as ComfyUI's ``sd2_clip``.

diffusers' SD2 ``text_encoder`` files keep 23 of ViT-H's 24 layers (SD2 never
uses the last). ComfyUI loads them into its 24-layer model; textenc builds 23
layers and numbers them as ViT-H's 24 (``released_model``), so the default
``-2`` is the file's last layer in both.
"""

from __future__ import annotations

from typing import Mapping

from .sd1_clip import SD1ClipModel, SD1Tokenizer, SDClipModel
from .registry import Family, Role, register_family
from ..prompts.tokenizer import SDTokenizer

__all__ = ["SD2ClipHModel", "SD2ClipHTokenizer", "SD2Tokenizer", "SD2ClipModel", "VIT_H_LAYERS"]

SD2_SPECIAL_TOKENS = {"start": 49406, "end": 49407, "pad": 0}
#: OpenCLIP ViT-H/14's depth (SD2's text encoder).
VIT_H_LAYERS = 24


class SD2ClipHModel(SDClipModel):
    """ViT-H/14 text encoder; ``layer="penultimate"`` means hidden layer -2 of ViT-H's 24."""

    released_model = ("ViT-H", VIT_H_LAYERS)

    def __init__(self, arch: str = "ViT-H-14", device="cpu", max_length: int = 77,
                 freeze: bool = True, layer: str = "penultimate", layer_idx: int | None = None,
                 dtype=None, textmodel_json_config=None, model_options: Mapping | None = None,
                 **kwargs) -> None:
        if layer == "penultimate":
            layer, layer_idx = "hidden", -2
        kwargs.setdefault("special_tokens", SD2_SPECIAL_TOKENS)
        kwargs.setdefault("return_projected_pooled", True)
        super().__init__(device=device, max_length=max_length, freeze=freeze, layer=layer,
                         layer_idx=layer_idx, textmodel_json_config=textmodel_json_config or "sd2_clip_config",
                         dtype=dtype, **kwargs)


class SD2ClipHTokenizer(SDTokenizer):
    """Pads with token 0 instead of the end token; embeddings are 1024 wide."""

    def __init__(self, tokenizer_path=None, embedding_directory=None, tokenizer_data=None, **kwargs) -> None:
        kwargs.setdefault("embedding_size", 1024)
        kwargs.setdefault("embedding_key", "clip_h")
        super().__init__(tokenizer_path, pad_with_end=False, embedding_directory=embedding_directory,
                         tokenizer_data=tokenizer_data, **kwargs)


class SD2Tokenizer(SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data=None, clip_name: str = "h", **kwargs) -> None:
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         clip_name=clip_name, tokenizer=SD2ClipHTokenizer, **kwargs)


class SD2ClipModel(SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None, clip_name: str = "h",
                 **kwargs) -> None:
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name=clip_name,
                         clip_model=SD2ClipHModel, **kwargs)


#: SD2: OpenCLIP ViT-H/14 (exact gelu, pads with token 0), its penultimate layer in ComfyUI;
#: diffusers' pipelines use the last layer of their 23-layer file, the same layer (-2 here).
SD2 = register_family(Family(
    "sd2", "SD2", roles=(Role("h", SD2ClipHModel, SD2ClipHTokenizer, activation="gelu", pad_token=0),),
    model_class=SD2ClipModel, tokenizer_class=SD2Tokenizer, comfy_default_layer=-2,
    diffusers_default_layer=-1, pipeline_prefix="StableDiffusion", checkpoint_layouts=("sd2",)))
