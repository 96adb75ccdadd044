"""textenc: CLIP text conditioning for Stable Diffusion, in the style of ComfyUI.

Importing the package is cheap: nothing is probed, loaded or downloaded here.
Heavy modules (torch models, tokenizers) are imported by the submodules that
need them.
"""

__version__ = "0.1.0"

from ._aliases import install as _install_old_paths

_install_old_paths()  # old import paths (textenc.sd1_clip, textenc.tokenizer, ...) keep working
