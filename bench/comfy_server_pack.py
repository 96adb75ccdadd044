"""The node-pack points of issue 28, checked in the real server of ``comfy_server_check.py``.

1. "Load Checkpoint CLIP (textenc)" (``CheckpointCLIPLoaderTextenc``) lists ``models/checkpoints``
   and loads only a checkpoint's text encoders: a tiny SD1-layout checkpoint (the tiny CLIP-L
   under ``cond_stage_model.transformer.``, plus UNet and VAE tensors filled with NaN, which a
   load of the whole model would refuse or carry) encodes as ComfyUI's own "Load CLIP" +
   "CLIP Text Encode" on the same CLIP-L file.
2. A CLIP from ComfyUI's own loader wired into textenc's encode nodes is refused with a
   message that names "Load CLIP (textenc)" and "Load Checkpoint CLIP (textenc)".
3. The pack renames no built-in node: every built-in node's display name and module are the
   same as in a server started with ``--disable-all-custom-nodes``, and the pack's own nodes
   (the ``Textenc...`` aliases and the checkpoint loader) show as "... (textenc)".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

CHECKPOINT = "sd1_tiny_checkpoint.safetensors"
PROMPT = "a photo of a (red:1.2) fox"
REFUSAL_NAMES = ("Load CLIP (textenc)", "Load Checkpoint CLIP (textenc)")
REFUSING_NODES = ("TextencCLIPTextEncode", "CLIPTextEncodeAdvancedTextenc", "TextencCLIPTextEncodeSDXL")


def write_checkpoint(clip_l_file: Path, folder: Path) -> None:
    """The tiny CLIP-L as an SD1 checkpoint's text encoder, beside NaN UNet and VAE tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = {f"cond_stage_model.transformer.{k}": v for k, v in load_file(str(clip_l_file)).items()}
    nan = torch.full((320, 4, 3, 3), float("nan"))
    weights.update({"model.diffusion_model.input_blocks.0.0.weight": nan,
                    "first_stage_model.decoder.conv_in.weight": nan.clone()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / CHECKPOINT))


def checkpoint_graph(clip_l_name: str, saves: Callable[[dict], dict]) -> dict:
    return {
        "60": {"class_type": "CheckpointCLIPLoaderTextenc", "inputs": {"ckpt_name": CHECKPOINT}},
        "61": {"class_type": "TextencCLIPTextEncode", "inputs": {"clip": ["60", 0], "text": PROMPT}},
        "62": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_l_name, "type": "stable_diffusion"}},
        "63": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["62", 0], "text": PROMPT}},
        **saves({"ckpt_textenc": "61", "ckpt_comfy": "63"}),
    }


def refusal_graph(clip_l_name: str, node: str, info: dict, saves: Callable[[dict], dict]) -> dict:
    """ComfyUI's own CLIPLoader's CLIP into textenc's encode node ``node`` (its other inputs:
    the prompt for text ones, the defaults ``/object_info`` gives for the rest)."""
    inputs = {"clip": ["70", 0]}
    for name, spec in info[node]["input"]["required"].items():
        if name != "clip":
            inputs[name] = PROMPT if spec[0] == "STRING" else spec[1].get("default", spec[0][0])
    return {"70": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_l_name, "type": "stable_diffusion"}},
            "71": {"class_type": node, "inputs": inputs},
            **saves({f"refused_{node}": "71"})}


def error_message(status: dict) -> str:
    """The exception message of a graph that failed (ComfyUI's ``execution_error``), or ''."""
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
    return ""


def display_rows(stock: dict, info: dict) -> list[tuple[str, str, bool]]:
    """Built-in nodes keep their names and modules; the pack's own show as "(textenc)".
    ``stock`` is ``/object_info`` of a server without custom nodes, ``info`` with the pack."""
    changed = [name for name in stock if (info[name]["display_name"], info[name]["python_module"])
               != (stock[name]["display_name"], stock[name]["python_module"])]
    rows = [(f"{len(stock)} built-in nodes: display name and module as without the pack",
             f"changed: {changed[:5]}" if changed else "none changed", not changed)]
    own = sorted(name for name in info if name not in stock and "textenc_nodes" in info[name]["python_module"])
    shadowed = sorted(name[len("Textenc"):] for name in own if name[len("Textenc"):] in stock)
    rows.append((f"{len(shadowed)} built-in names the pack also defines stay ComfyUI's",
                 ", ".join(f"{name}={info[name]['display_name']!r}" for name in shadowed
                           if name in ("ConditioningAverage", "CLIPLoader", "CLIPTextEncode")),
                 bool(shadowed) and all(name not in changed for name in shadowed)))
    untagged = [name for name in own if "textenc" not in info[name]["display_name"]]
    rows.append((f"the pack's {len(own)} own nodes are served and say textenc",
                 f"untagged {untagged}" if untagged else
                 f"e.g. {info['CheckpointCLIPLoaderTextenc']['display_name']!r}, "
                 f"{info['TextencConditioningAverage']['display_name']!r}", bool(own) and not untagged))
    listed = info["CheckpointCLIPLoaderTextenc"]["input"]["required"]["ckpt_name"][0]
    rows.append(("checkpoint loader lists models/checkpoints", json.dumps(listed), CHECKPOINT in listed))
    return rows


def refusal_rows(statuses: dict[str, dict]) -> list[tuple[str, str, bool]]:
    rows = []
    for node, status in statuses.items():
        message = error_message(status)
        ok = status.get("status_str") == "error" and all(name in message for name in REFUSAL_NAMES)
        rows.append((f"ComfyUI's CLIP into {node} is refused", message[:400], ok))
    return rows
