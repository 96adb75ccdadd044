"""textenc's ComfyUI node pack: thin adapters over the textenc library.

The repository folder is ``nodes/``; ``pip install`` installs it as
``textenc_nodes`` (never as a top-level ``nodes``, the name of ComfyUI's own
``nodes.py``). A host loads it as a package under a name of its own (ComfyUI
imports ``custom_nodes/<folder>/__init__.py`` named after its path), so modules
here import each other relatively and the library absolutely. Importing is
cheap: no torch, no model files; library modules are imported when a node runs.
Every node's FUNCTION is wrapped by :func:`.validate.checked` (typed errors
naming the input; CONDITIONING outputs finite).
"""

from .conditioning import (ConditioningAverage, ConditioningCombine, ConditioningConcat,
                           ConditioningZeroOut, FluxGuidance, unCLIPConditioning)
from .family_encode import CLIPTextEncodeFlux, CLIPTextEncodeSD3
from .loaders import (CheckpointCLIPLoaderTextenc, CLIPLoader, CLIPVisionLoader, DualCLIPLoader, PhotoMakerLoader,
                      TripleCLIPLoader)
from .text_encode import (CLIPSetLastLayer, CLIPTextEncode, CLIPTextEncodeAdvancedTextenc,
                          CLIPTextEncodeSDXL)
from .vision import CLIPVisionEncode, PhotoMakerEncode

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

# (class, display name); the pack's own nodes end with "Textenc".
_NODES = [
    (CheckpointCLIPLoaderTextenc, "Load Checkpoint CLIP (textenc)"),
    (CLIPLoader, "Load CLIP"),
    (DualCLIPLoader, "DualCLIPLoader"),
    (TripleCLIPLoader, "TripleCLIPLoader"),
    (CLIPSetLastLayer, "CLIP Set Last Layer"),
    (CLIPTextEncode, "CLIP Text Encode (Prompt)"),
    (CLIPTextEncodeSDXL, "CLIPTextEncodeSDXL"),
    (CLIPTextEncodeSD3, "CLIPTextEncodeSD3"),
    (CLIPTextEncodeFlux, "CLIPTextEncodeFlux"),
    (FluxGuidance, "FluxGuidance"),
    (CLIPTextEncodeAdvancedTextenc, "CLIP Text Encode (Advanced, textenc)"),
    (CLIPVisionLoader, "Load CLIP Vision"),
    (CLIPVisionEncode, "CLIP Vision Encode"),
    (unCLIPConditioning, "unCLIPConditioning"),
    (PhotoMakerLoader, "PhotoMakerLoader"),
    (PhotoMakerEncode, "PhotoMakerEncode"),
    (ConditioningConcat, "Conditioning (Concat)"),
    (ConditioningCombine, "Conditioning (Combine)"),
    (ConditioningAverage, "ConditioningAverage"),
    (ConditioningZeroOut, "ConditioningZeroOut"),
]

#: Display names stock ComfyUI gives its own nodes of these names (nodes.py's
#: NODE_DISPLAY_NAME_MAPPINGS; its "ConditioningAverage " key has a trailing space, so that
#: node shows as "ConditioningAverage"). ComfyUI merges every pack's display names into its
#: own, so the pack names a built-in node only as ComfyUI does, never otherwise.
COMFYUI_DISPLAY_NAMES = {"CLIPLoader": "Load CLIP", "CLIPSetLastLayer": "CLIP Set Last Layer",
                         "CLIPTextEncode": "CLIP Text Encode (Prompt)", "CLIPVisionLoader": "Load CLIP Vision",
                         "CLIPVisionEncode": "CLIP Vision Encode", "ConditioningCombine": "Conditioning (Combine)",
                         "ConditioningConcat": "Conditioning (Concat)"}

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls, _ in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: display for cls, display in _NODES
                              if cls.__name__.endswith("Textenc") or cls.__name__ in COMFYUI_DISPLAY_NAMES}

# Stock ComfyUI skips a custom node whose name is already a built-in one, so
# under exact names only the advanced node would appear there. Prefixed aliases
# of every node let the textenc stack run side by side with ComfyUI's (a CLIP
# from a textenc loader must go to textenc encode nodes; CONDITIONING is the
# same format either way).
ALIAS_PREFIX = "Textenc"
for _cls, _display in _NODES:
    if not _cls.__name__.endswith("Textenc"):
        NODE_CLASS_MAPPINGS[ALIAS_PREFIX + _cls.__name__] = _cls
        NODE_DISPLAY_NAME_MAPPINGS[ALIAS_PREFIX + _cls.__name__] = f"{_display} (textenc)"
