"""Loader nodes: text encoders (one, two or three files), CLIP vision, PhotoMaker.

Files are listed and resolved through :mod:`textenc.loading.paths` (ComfyUI's
``folder_paths`` inside ComfyUI). Nothing is cached here: ComfyUI's executor
caches node outputs. Library modules are imported inside the functions so that
importing the node pack stays cheap.
"""

from __future__ import annotations

from textenc.loading import paths
from textenc.text_encoders.names import CLIP_TYPE_HELP, CLIP_TYPES, ROLES, families_with_parts

from .validate import checked

#: ComfyUI's ``CLIPLoader`` names that are not a family name here, and what they mean:
#: ``stable_diffusion`` is SD1 (CLIP-L) or SD2 (CLIP-H), told apart by the weights.
COMFY_TYPE_NAMES = {"stable_diffusion": "auto", "auto": "auto"}
#: ``type`` of CLIPLoader -> clip_type: ComfyUI's names, then every family (the registry's,
#: via :mod:`textenc.text_encoders.names`, which imports no torch).
CLIP_LOADER_TYPES = {**COMFY_TYPE_NAMES, **{name: name for name in CLIP_TYPES}}
#: DualCLIPLoader takes the families of two or more text encoders (sdxl, sd3, flux).
DUAL_CLIP_LOADER_TYPES = {name: name for name in families_with_parts(2)}
#: TripleCLIPLoader has no type: three files are the family of three encoders (SD3), as ComfyUI.
(TRIPLE_CLIP_TYPE,) = families_with_parts(3)
DEVICES = ["default", "cpu"]


def _device(name: str) -> str:
    """``default``: the GPU when there is one, decided when the node runs."""
    if name == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _full_path(node: str, input_name: str, kind: str, name: str) -> str:
    """The file of a model name, via :mod:`textenc.loading.paths`; its errors name the node and input."""
    from textenc.errors import CheckpointError

    try:
        return paths.get_full_path(kind, name)
    except CheckpointError as exc:
        raise CheckpointError(f"{node}: {input_name} {exc}") from None


def _load_clip(node: str, names: dict[str, str], clip_type: str, device: str):
    from textenc.sd import load_clip

    files = [_full_path(node, input_name, "text_encoders", name) for input_name, name in names.items()]
    embeddings = paths.embedding_directories() or None
    return load_clip(files, embedding_directory=embeddings, clip_type=clip_type, device=_device(device))


def _file_input(folder: str, tooltip: str) -> tuple:
    """A combo input listing the files of a model folder."""
    return (paths.get_filename_list(folder), {"tooltip": tooltip})


def _recipes(families) -> str:
    """``sd3: l + g + t5xxl`` lines: the text encoders each family takes."""
    return "\n".join(f"{name}: {' + '.join(ROLES[name])}" for name in families)


def _device_input() -> dict:
    return {"device": (DEVICES, {"default": "default", "advanced": True,
                                 "tooltip": "Where the text encoder runs: 'default' uses the GPU "
                                            "when there is one."})}


class CLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
                    "clip_name": _file_input("text_encoders",
                                             "Text encoder file in models/text_encoders (or models/clip)."),
                    "type": (list(CLIP_LOADER_TYPES),
                             {"default": "stable_diffusion",
                              "tooltip": "stable_diffusion: ComfyUI's name for auto. " + CLIP_TYPE_HELP})},
                "optional": _device_input()}

    FILE_INPUTS = ("clip_name",)
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The CLIP text encoder with its tokenizer.",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("Loads a text encoder file (clip_l, ViT-H, clip_g, T5-XXL or UMT5-XXL: fp16, bf16, fp8 "
                   "scaled or GGUF) or a checkpoint's text encoders. Textual inversions are read from the "
                   "embeddings folder.\n\n[Recipes]\n\n" + _recipes(CLIP_TYPES))

    @checked
    def load_clip(self, clip_name: str, type: str = "stable_diffusion", device: str = "default"):
        return (_load_clip("CLIPLoader", {"clip_name": clip_name}, CLIP_LOADER_TYPES[type], device),)


class DualCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        names = paths.get_filename_list("text_encoders")
        return {"required": {
                    "clip_name1": (names, {"tooltip": "First text encoder file (either order)."}),
                    "clip_name2": (names, {"tooltip": "Second text encoder file (either order)."}),
                    "type": (list(DUAL_CLIP_LOADER_TYPES), {"default": "sdxl", "tooltip": CLIP_TYPE_HELP})},
                "optional": _device_input()}

    FILE_INPUTS = ("clip_name1", "clip_name2")
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The combined CLIP text encoders with their tokenizers.",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("Loads two text encoder files as one CLIP, in either order.\n\n[Recipes]\n\n"
                   + _recipes(DUAL_CLIP_LOADER_TYPES) + "\n(sd3: any two of its three)")

    @checked
    def load_clip(self, clip_name1: str, clip_name2: str, type: str = "sdxl", device: str = "default"):
        names = {"clip_name1": clip_name1, "clip_name2": clip_name2}
        return (_load_clip("DualCLIPLoader", names, DUAL_CLIP_LOADER_TYPES[type], device),)


class TripleCLIPLoader:
    @classmethod
    def INPUT_TYPES(cls):
        names = paths.get_filename_list("text_encoders")
        return {"required": {f"clip_name{index}": (names, {"tooltip": "A text encoder file (any order)."})
                             for index in (1, 2, 3)},
                "optional": _device_input()}

    FILE_INPUTS = ("clip_name1", "clip_name2", "clip_name3")
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The three text encoders as one CLIP with their tokenizers.",)
    FUNCTION = "load_clip"
    CATEGORY = "advanced/loaders"
    DESCRIPTION = ("Loads three text encoder files as one CLIP, in any order.\n\n[Recipes]\n\n"
                   + _recipes([TRIPLE_CLIP_TYPE]))

    @checked
    def load_clip(self, clip_name1: str, clip_name2: str, clip_name3: str, device: str = "default"):
        names = {"clip_name1": clip_name1, "clip_name2": clip_name2, "clip_name3": clip_name3}
        return (_load_clip("TripleCLIPLoader", names, TRIPLE_CLIP_TYPE, device),)


class CheckpointCLIPLoaderTextenc:
    """ComfyUI's "Load Checkpoint", text encoders only: the CLIP of a full SD checkpoint."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": _file_input("checkpoints", "Full checkpoint in models/checkpoints "
                                                                    "(SD1, SD2, SDXL, SD3 with its text "
                                                                    "encoders, Flux all-in-one).")},
                "optional": _device_input()}

    FILE_INPUTS = ("ckpt_name",)
    RETURN_TYPES = ("CLIP",)
    OUTPUT_TOOLTIPS = ("The checkpoint's CLIP text encoder(s) with their tokenizers.",)
    FUNCTION = "load_checkpoint"
    CATEGORY = "loaders"
    DESCRIPTION = ("Loads only the text encoders of a checkpoint in models/checkpoints (the UNet and VAE are "
                   "not loaded; a .safetensors file's other weights are never read), detecting the family "
                   "(SD1, SD2, SDXL, SD3, Flux). Use ComfyUI's Load Checkpoint for the MODEL and VAE.")

    @checked
    def load_checkpoint(self, ckpt_name: str, device: str = "default"):
        from textenc.sd import load_clip

        path = _full_path("CheckpointCLIPLoaderTextenc", "ckpt_name", "checkpoints", ckpt_name)
        embeddings = paths.embedding_directories() or None
        return (load_clip([path], embedding_directory=embeddings, device=_device(device)),)


class CLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": _file_input("clip_vision", "CLIP vision file in models/clip_vision.")}}

    FILE_INPUTS = ("clip_name",)
    RETURN_TYPES = ("CLIP_VISION",)
    OUTPUT_TOOLTIPS = ("The CLIP vision model.",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"
    DESCRIPTION = "Loads a CLIP vision model (ViT-L/14, ViT-L/14-336, ViT-H/14, ViT-bigG/14; HF or open_clip keys)."

    @checked
    def load_clip(self, clip_name: str):
        from textenc.vision import clip_vision

        return (clip_vision.load(_full_path("CLIPVisionLoader", "clip_name", "clip_vision", clip_name)),)


class PhotoMakerLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"photomaker_model_name": _file_input(
            "photomaker", "PhotoMaker v1 file in models/photomaker.")}}

    FILE_INPUTS = ("photomaker_model_name",)
    RETURN_TYPES = ("PHOTOMAKER",)
    OUTPUT_TOOLTIPS = ("The PhotoMaker ID encoder.",)
    FUNCTION = "load_photomaker_model"
    CATEGORY = "_for_testing/photomaker"
    DESCRIPTION = "Loads the ID encoder of a PhotoMaker v1 checkpoint (.bin or .safetensors), safely."

    @checked
    def load_photomaker_model(self, photomaker_model_name: str):
        from textenc.vision.photomaker import load_photomaker

        path = _full_path("PhotoMakerLoader", "photomaker_model_name", "photomaker", photomaker_model_name)
        return (load_photomaker(path),)
