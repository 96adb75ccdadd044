"""``textenc vision``: image files → ``image_embeds_{i}`` with a CLIP vision model."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import CheckpointError, TextencError
from ..loading.model_path import check_model_path
from .common import add_progress_flag, check_out_file, progress, show_path, write_file_atomically

__all__ = ["add_vision", "run_vision"]


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise TextencError("textenc vision needs Pillow: pip install 'textenc[vision]' "
                           "(or pip install pillow)") from None
    return Image


def _not_an_image(path: str, error: Exception) -> TextencError:
    return TextencError(f"{show_path(path)}: not an image Pillow can read ({error.__class__.__name__}); "
                        "give a PNG, JPEG, WebP, ... file")


def _check_image(path: str) -> None:
    """Refuse a missing file or one Pillow cannot identify, before the model loads
    (``verify`` reads the header and, for PNG, the checksums; it decodes no pixels)."""
    if not os.path.isfile(path):
        raise TextencError(f"{show_path(path)}: image file does not exist")
    try:
        with _pillow().open(path) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        raise _not_an_image(path, error) from None


def _read_image(path: str):
    import numpy as np
    import torch

    try:
        with _pillow().open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as error:  # Pillow's UnidentifiedImageError is an OSError
        raise _not_an_image(path, error) from None
    return torch.from_numpy(pixels)[None]  # (1, H, W, 3) in 0..1, ComfyUI's IMAGE


def _check_model_file(path: str) -> str:
    path = check_model_path(path)
    if os.path.isdir(path):
        inside = [name for name in ("model.safetensors", "pytorch_model.bin") if os.path.isfile(
            os.path.join(path, name))]
        hint = f" ({os.path.join(show_path(path), inside[0])})" if inside else ""
        raise CheckpointError(f"--model {show_path(path)}: is a folder; pass the CLIP vision weight file "
                              f"inside it{hint}")
    return path


def run_vision(args: argparse.Namespace) -> int:
    """Encode the images; every input is checked before the model loads."""
    check_out_file(args.out, suffix=".safetensors")
    model_file = _check_model_file(args.model)
    for path in args.images:
        _check_image(path)
    from safetensors.torch import save

    from ..vision import clip_vision

    model = clip_vision.load(model_file)
    tensors = {}
    for index, path in enumerate(progress(list(args.images), "vision", "image", enabled=args.progress or None)):
        out = model.encode_image(_read_image(path), crop=args.crop == "center")
        tensors[f"image_embeds_{index}"] = out.image_embeds.detach().contiguous().cpu()
        if args.hidden_states:
            tensors[f"penultimate_hidden_states_{index}"] = out.penultimate_hidden_states.contiguous().cpu()
    metadata = {"format": "textenc.vision/1",
                "images": json.dumps([show_path(os.path.basename(p)) for p in args.images]),
                "options": json.dumps({"crop": args.crop, "model": show_path(os.path.basename(args.model))})}
    write_file_atomically(args.out, save(tensors, metadata=metadata))
    print(f"wrote {len(args.images)} image embedding(s) to {show_path(args.out)}: "
          f"{tuple(tensors['image_embeds_0'].shape)} each")
    return 0


def add_vision(sub) -> argparse.ArgumentParser:
    """Add ``vision`` to the ``textenc`` sub-parsers; returns its parser."""
    parser = sub.add_parser("vision", help="encode images with a CLIP vision model",
                            description="Encode image files; writes image_embeds_{i} per image.")
    add = parser.add_argument
    add("images", nargs="+", help="image files (PNG, JPEG, ...)")
    add("--model", required=True, metavar="FILE",
        help="CLIP vision checkpoint file: HF or open_clip layout, or an SD2.1-unCLIP / SVD checkpoint "
             "(required)")
    add("--crop", choices=("center", "none"), default="center",
        help="center: resize the short side, then crop the middle square; none: stretch the whole image to the square")
    add("--hidden-states", action="store_true", help="also save penultimate_hidden_states_{i}")
    add_progress_flag(parser)
    add("--out", required=True, metavar="FILE", help="output .safetensors file; its folder must exist (required)")
    parser.set_defaults(run=run_vision)
    return parser
