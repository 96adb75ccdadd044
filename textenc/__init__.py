"""textenc: CLIP text conditioning for Stable Diffusion, in the style of ComfyUI.

Importing the package is cheap: nothing is probed, loaded or downloaded here.
Heavy modules (torch models, tokenizers) are imported by the submodules that
need them.
"""

__version__ = "0.1.0"
