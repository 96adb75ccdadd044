"""ComfyUI-compatible SD1 text encoder: ``SDClipModel`` and the ``SD1*`` wrappers.

``SDClipModel.encode_token_weights`` turns the windows produced by
``SDTokenizer.tokenize_with_weights`` into ``(cond [1, 77·windows, width],
pooled [1, width])`` exactly as ComfyUI does by default, with these
differences in the machinery (never in the default result):

* all windows go through one batched forward; the empty-prompt encoding used
  for weighting is computed once per options and cached;
* clip options can be passed per call (``options={"layer": -2}``), so threads
  sharing one model never mutate it; ``set_clip_options`` still sets the
  instance default, as in ComfyUI;
* textual-inversion vectors are written into this call's input embeddings
  only — the shared embedding table is never touched.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..nn import ops
from ..nn.clip_model import CLIPTextModel
from ..nn.config import load_text_config
from ..errors import PromptError
from .clip_skip import LayerNumbering
from ..lru import LRUCache
from ..prompts.tokenizer import SDTokenizer
from .options import ClipOptions
from . import encode as sd1_encode
from .batch import FamilyEncodeMixin
from .registry import Family, Role, register_family

__all__ = ["SDClipModel", "SD1ClipModel", "SD1Tokenizer", "SDTokenizer", "ClipOptions",
           "ClipTokenWeightEncoder", "gen_empty_tokens"]

LAYERS = ("last", "pooled", "hidden", "all")
SD1_SPECIAL_TOKENS = {"start": 49406, "end": 49407, "pad": 49407}


def gen_empty_tokens(special_tokens: Mapping[str, int], length: int) -> list[int]:
    """The empty prompt as ComfyUI encodes it: start, end, then padding to ``length``."""
    output = [special_tokens[k] for k in ("start", "end") if special_tokens.get(k) is not None]
    return output + [special_tokens["pad"]] * (length - len(output))


class ClipTokenWeightEncoder:
    """Mixin: ``encode_token_weights`` over ``self.encode_windows`` (ComfyUI name)."""

    def encode_token_weights(self, token_weight_pairs, *, options: Mapping[str, Any] | None = None,
                             need_pooled: bool = True):
        """``(cond [1, T·windows, D], pooled [1, P])`` of weighted token windows (ComfyUI's).

        ``options`` hold for this call only. ``need_pooled=False`` (the caller
        discards pooled, as SDXL does with its L encoder) returns None for it and
        skips what only pooled needs (compel's raw-text window); cond is unchanged.
        """
        return sd1_encode.encode_token_weights(self, token_weight_pairs, self.resolve_options(options),
                                               need_pooled=need_pooled)


class SDClipModel(torch.nn.Module, ClipTokenWeightEncoder):
    """CLIP text encoder as used by Stable Diffusion (ComfyUI's ``SDClipModel``).

    Args:
        device: where weights and activations live.
        max_length: tokens per window.
        freeze: put the model in eval mode without gradients.
        layer: ``"last"``, ``"pooled"``, ``"hidden"`` (with ``layer_idx``) or ``"all"``.
        layer_idx: intermediate layer for ``"hidden"``, in ComfyUI's numbering
            (:attr:`numbering`); negative counts from the end.
        textmodel_json_config: config name, JSON path or dict (default: CLIP ViT-L/14).
        dtype: storage dtype of the weights (None: keep the checkpoint's).
        special_tokens: ``{"start", "end", "pad"}`` token ids.
        layer_norm_hidden_state: apply the final layer norm to an intermediate layer.
        enable_attention_masks: mask padding inside the transformer.
        zero_out_masked: zero the outputs at masked positions.
        return_projected_pooled: pooled output through ``text_projection``.
        return_attention_masks: add ``{"attention_mask": ...}`` as a third output.
        compute_dtype: activation dtype (fp32 default; bf16 is faster on CPUs with AVX512-BF16).
        weight_mode / normalization: see :mod:`textenc.text_encoders.weighting`.
        cache_size: entries of the optional LRU cache of encodings (0 disables it).

    Every layer index (``layer_idx``, ``set_clip_options({"layer": ...})``,
    per-call ``options``) is ComfyUI's: :attr:`numbering` counts
    :attr:`numbered_layers`, the released model's depth when the weights lack
    its last layer (:attr:`released_model`), and maps it onto the
    :attr:`num_layers` layers the model has.

    Attributes:
        empty_cache: :class:`~textenc.lru.LRUCache` (unbounded) of the empty
            prompt's ``(z (T, D), pooled (P,))``, keyed ``(ClipOptions, T)``
            (:func:`textenc.text_encoders.encode.empty_encoding` fills it).
        encode_cache: :class:`~textenc.lru.LRUCache` of ``cache_size`` whole
            encodings, keyed by options and tokens (0: off). Both are emptied by
            :meth:`clear_caches` and whenever weights are loaded.
    """

    LAYERS = LAYERS
    #: ``(name, depth)`` of the released model this encoder is numbered as when its weights
    #: lack that model's last layer, as ComfyUI does; None: always its own depth.
    released_model: tuple[str, int] | None = None

    def __init__(self, device="cpu", max_length: int = 77, freeze: bool = True,
                 layer: str = "last", layer_idx: int | None = None,
                 textmodel_json_config=None, dtype: torch.dtype | None = None,
                 model_class=CLIPTextModel, special_tokens: Mapping[str, int] | None = None,
                 layer_norm_hidden_state: bool = True, enable_attention_masks: bool = False,
                 zero_out_masked: bool = False, return_projected_pooled: bool = True,
                 return_attention_masks: bool = False, model_options: Mapping | None = None,
                 *, compute_dtype: torch.dtype = torch.float32, weight_mode: str = "comfy",
                 normalization: str = "none", cache_size: int = 0) -> None:
        super().__init__()
        if layer not in LAYERS:
            raise PromptError(f"layer {layer!r} is not one of {LAYERS}")
        # A model class with a config of its own (T5) says how to read it.
        load_config = getattr(model_class, "load_config", load_text_config)
        config = load_config(textmodel_json_config or "sd1_clip_config")
        self.config = config
        self.max_length = max_length
        self.special_tokens = dict(special_tokens or SD1_SPECIAL_TOKENS)
        self.storage_dtype = dtype
        self.device = torch.device(device)
        # manual_cast: a no-op when dtypes already match, and lets a checkpoint keep
        # its own dtype (fp16 file, fp32 compute) without a second copy.
        self.transformer = model_class(config, dtype=dtype, device="meta", operations=ops.manual_cast)
        self.num_layers = self.transformer.num_layers
        self.numbering = LayerNumbering.of(self.num_layers, self.released_model)
        self.enable_attention_masks = enable_attention_masks
        self.zero_out_masked = zero_out_masked
        self.return_attention_masks = return_attention_masks
        self.freeze = freeze
        base = ClipOptions(layer=layer, layer_idx=layer_idx,
                           layer_norm_hidden_state=layer_norm_hidden_state,
                           return_projected_pooled=return_projected_pooled,
                           compute_dtype=compute_dtype)
        base = base.updated({"weight_mode": weight_mode, "normalization": normalization},
                            self.numbering)
        self.options_default = base
        self.options = base
        self.layer, self.layer_idx = base.layer, base.layer_idx
        self.loaded = False
        self.empty_cache = LRUCache(None)  # (options, length) -> empty-prompt encoding
        self.encode_cache = LRUCache(max(cache_size, 0))
        self.cache_size = cache_size

    # ---- options -------------------------------------------------------------
    @property
    def numbered_layers(self) -> int:
        """The layers ComfyUI's numbering counts (24 for diffusers' 23-layer SD2 ViT-H)."""
        return self.numbering.numbered

    def set_clip_options(self, options: Mapping[str, Any]) -> None:
        """Set the instance's default options (ComfyUI API; e.g. ``{"layer": -2}``).

        Raises:
            LayerError: a layer outside :attr:`numbering` (see :class:`~textenc.text_encoders.clip_skip.LayerNumbering`).
        """
        self.options = self.options.updated(options, self.numbering)
        self.layer, self.layer_idx = self.options.layer, self.options.layer_idx

    def reset_clip_options(self) -> None:
        self.options = self.options_default
        self.layer, self.layer_idx = self.options.layer, self.options.layer_idx

    def resolve_options(self, options: Mapping[str, Any] | None) -> ClipOptions:
        """The options of one call: the instance default updated by ``options``."""
        return self.options if not options else self.options.updated(options, self.numbering)

    # ---- weights -------------------------------------------------------------
    def load_sd(self, sd: Mapping[str, torch.Tensor], *, strict: bool = True, require_finite: bool = True):
        """Load an HF-layout text-encoder state dict (``text_model.*``, ``text_projection.weight``).

        Tensors are assigned, not copied, when their dtype already matches, so a
        memory-mapped safetensors file is not read into a second buffer; only a
        tensor the file stores at an offset that is not 64-byte aligned is copied
        (:func:`textenc.loading.checkpoint.aligned`: results then do not depend on the
        file's layout). SD1
        checkpoints carry no ``text_projection``: it is set to the identity
        (their pooled output is returned unprojected anyway).

        Args:
            strict: refuse keys the model does not have (``False`` ignores them
                and returns them as ``unexpected_keys``); missing keys always fail.
            require_finite: refuse NaN or infinite weights (a cheap sum per tensor).

        Raises:
            CheckpointError: missing, mis-shaped or (``strict``) unexpected keys,
                integer weights, or (``require_finite``) non-finite values; the
                message names the tensor.
        """
        return sd1_encode.load_text_state_dict(self, sd, strict=strict, require_finite=require_finite)

    def get_sd(self) -> dict[str, torch.Tensor]:
        return self.transformer.state_dict()

    def gen_empty_tokens(self, special_tokens: Mapping[str, int], length: int) -> list[int]:
        return gen_empty_tokens(special_tokens, length)

    def forward(self, tokens: Sequence[Sequence[Any]], *, options: Mapping[str, Any] | None = None):
        """Encode windows of tokens (ints or 1-D embedding tensors) → ``(z, pooled[, extra])``."""
        return sd1_encode.encode_windows(self, tokens, self.resolve_options(options))

    def encode(self, tokens, *, options: Mapping[str, Any] | None = None):
        return self(tokens, options=options)

    def clear_caches(self) -> None:
        """Empty :attr:`empty_cache` and :attr:`encode_cache`."""
        self.empty_cache.clear()
        self.encode_cache.clear()


class SD1ClipModel(FamilyEncodeMixin, torch.nn.Module):
    """Holds one named encoder (``clip_l`` by default), keyed as ComfyUI's wrappers.

    :attr:`encoders` maps its role (``clip_name``) to the encoder; the batched
    encode and the empty window come from :class:`~textenc.text_encoders.batch.FamilyEncodeMixin`.
    """

    def __init__(self, device="cpu", dtype=None, model_options: Mapping | None = None,
                 clip_name: str = "l", clip_model=SDClipModel, name: str | None = None,
                 **kwargs) -> None:
        super().__init__()
        self.clip_name = name if name is not None else clip_name
        self.clip = name if name is not None else f"clip_{clip_name}"
        if "return_projected_pooled" not in kwargs and clip_model is SDClipModel:
            # SD1 checkpoints have no text projection: their pooled output is unprojected.
            kwargs["return_projected_pooled"] = False
        setattr(self, self.clip, clip_model(device=device, dtype=dtype, **kwargs))
        self.dtypes = {dtype} if dtype is not None else set()

    @classmethod
    def for_roles(cls, configs: Mapping[str, Any], *, device="cpu", dtype=None) -> "SD1ClipModel":
        """The wrapper of one role, from ``{role: text config}`` (what :func:`textenc.sd.build_clip` passes)."""
        ((role, config),) = configs.items()
        return cls(device=device, dtype=dtype, textmodel_json_config=config, clip_name=role)

    @property
    def encoder(self) -> SDClipModel:
        return getattr(self, self.clip)

    @property
    def encoders(self) -> dict[str, SDClipModel]:
        """``{role: encoder}`` (one role)."""
        return {self.clip_name: self.encoder}

    def set_clip_options(self, options) -> None:
        self.encoder.set_clip_options(options)

    def reset_clip_options(self) -> None:
        self.encoder.reset_clip_options()

    def encode_token_weights(self, token_weight_pairs, *, options=None, need_pooled: bool = True):
        """The encoder's :meth:`~SDClipModel.encode_token_weights` of ``token_weight_pairs[clip_name]``."""
        if self.clip_name not in token_weight_pairs:
            raise PromptError(f"tokens for encoder {self.clip_name!r} missing; got "
                              f"{sorted(token_weight_pairs)} (tokenize with the matching tokenizer)")
        return self.encoder.encode_token_weights(token_weight_pairs[self.clip_name], options=options,
                                                 need_pooled=need_pooled)

    def load_sd(self, sd, *, strict: bool = True, require_finite: bool = True):
        return self.encoder.load_sd(sd, strict=strict, require_finite=require_finite)


class SD1Tokenizer:
    """Tokenizer wrapper returning ``{clip_name: windows}`` (ComfyUI's ``SD1Tokenizer``)."""

    def __init__(self, embedding_directory=None, tokenizer_data: Mapping | None = None,
                 clip_name: str = "l", tokenizer=SDTokenizer, name: str | None = None,
                 **kwargs) -> None:
        self.clip_name = name if name is not None else clip_name
        self.clip = name if name is not None else f"clip_{clip_name}"
        setattr(self, self.clip, tokenizer(embedding_directory=embedding_directory,
                                           tokenizer_data=dict(tokenizer_data or {}), **kwargs))

    @classmethod
    def for_roles(cls, arguments: Mapping[str, Mapping[str, Any]], *, embedding_directory=None) -> "SD1Tokenizer":
        """The wrapper of one role, from ``{role: tokenizer arguments}``."""
        ((role, kwargs),) = arguments.items()
        return cls(embedding_directory=embedding_directory, clip_name=role, **kwargs)

    @property
    def tokenizer(self) -> SDTokenizer:
        return getattr(self, self.clip)

    @property
    def tokenizers(self) -> dict[str, SDTokenizer]:
        """``{role: tokenizer}`` (one role)."""
        return {self.clip_name: self.tokenizer}

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs):
        return {self.clip_name: self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)}

    def untokenize(self, token_weight_pair):
        return self.tokenizer.untokenize(token_weight_pair)

    def state_dict(self) -> dict:
        return self.tokenizer.state_dict()


#: SD1: OpenAI's CLIP ViT-L/14, its last layer (ComfyUI's and diffusers' default).
SD1 = register_family(Family(
    "sd1", "SD1", roles=(Role("l", SDClipModel, SDTokenizer),),
    model_class=SD1ClipModel, tokenizer_class=SD1Tokenizer, comfy_default_layer=-1,
    diffusers_default_layer=-1, pipeline_prefix="StableDiffusion", checkpoint_layouts=("sd1",)))
