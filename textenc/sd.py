"""ComfyUI's ``CLIP`` (a tokenizer plus its text-encoder model) and loading it from checkpoint files.

Finding the encoders in the files is :mod:`textenc.loading.text_encoders`; this
module builds the model and wraps it (its names are re-exported here).

>>> # clip = load_clip(["model.safetensors"], embedding_directory="embeddings")
>>> # cond, pooled = clip.encode_from_tokens(clip.tokenize("a (red:1.2) fox"), return_pooled=True)
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import torch

from .prompts.limits import check_prompt_size
from .prompts.dialects import default_weight_mode, get_dialect, prompt_schedules
from .errors import CheckpointError, TextencError
from .text_encoders.families import CLIP_TYPES, ROLES, Family, families, family_for_encoders, get_family
from .text_encoders.selection import check_family, detect_family, role_config, tokenizer_arguments
from .text_encoders.sd1_clip import SDClipModel
from .text_encoders.schedules import schedule_encoder
from .prompts.step_ranges import step_ranges
from .prompts.tokenizer import SDTokenizer
from .loading.text_encoders import (FoundTextEncoder, load_text_encoder_files, load_text_encoder_state_dicts,
                                    text_config_from_info)

__all__ = ["CLIP", "CLIP_TYPES", "ROLES", "build_clip", "load_clip", "load_text_encoder_state_dicts",
           "text_config_from_info", "detect_clip_type", "conditioning_at_step", "FoundTextEncoder"]


class CLIP:
    """A tokenizer plus a text-encoder model, as ComfyUI's ``comfy.sd.CLIP``.

    ``clone()`` shares the model and tokenizer but keeps its own clip-skip
    setting; every encode passes its options per call, so clones used from
    different threads never interfere.
    """

    def __init__(self, cond_stage_model: torch.nn.Module, tokenizer: Any, *,
                 clip_type: str = "sd1") -> None:
        self.cond_stage_model = cond_stage_model
        self.tokenizer = tokenizer
        self.clip_type = clip_type
        self.layer_idx: int | None = None

    def clone(self) -> "CLIP":
        other = CLIP(self.cond_stage_model, self.tokenizer, clip_type=self.clip_type)
        other.layer_idx = self.layer_idx
        return other

    @property
    def family(self) -> Family:
        """This CLIP's :class:`~textenc.text_encoders.registry.Family` (its ``clip_type``'s entry)."""
        return get_family(self.clip_type)

    def _encoders(self) -> list[SDClipModel]:
        """The text encoders of the model, in role order (the wrapper's ``encoders``)."""
        return list(getattr(self.cond_stage_model, "encoders", {}).values())

    @property
    def num_layers(self) -> int:
        """Depth of the shallowest text encoder as loaded (23 for diffusers' SD2 ViT-H)."""
        return min(encoder.num_layers for encoder in self._encoders())

    @property
    def numbered_layers(self) -> int:
        """The layers ComfyUI's numbering counts for the shallowest text encoder (24 for
        diffusers' 23-layer SD2 ViT-H): ``layer`` values run ``-numbered_layers..-1``."""
        return min(encoder.numbered_layers for encoder in self._encoders())

    def check_layer(self, layer: object) -> int:
        """ComfyUI's ``layer``, checked against each text encoder's numbering (SDXL: both).

        Raises:
            LayerError: not an integer, or a layer an encoder does not have.
        """
        return [encoder.numbering.check(layer) for encoder in self._encoders()][0]

    def numbered_index(self, model_index: int) -> int:
        """ComfyUI's ``layer`` for the loaded model's own (negative) hidden-layer index: the
        inverse of the numbering :meth:`check_layer` applies (diffusers' 23-layer SD2 file:
        its last layer, ``-1``, is ViT-H's ``-2``). Layer numbering is each encoder's own
        (:class:`~textenc.text_encoders.clip_skip.LayerNumbering`); negative indices map the
        same for every encoder of a CLIP that lacks no layers (SDXL's L and G)."""
        return [encoder.numbering.numbered_index(model_index) for encoder in self._encoders()][0]

    def clip_layer(self, layer_idx: int | None) -> None:
        """Set the layer every encode uses, in ComfyUI's ``CLIPSetLastLayer`` numbering
        (diffusers' 23-layer SD2 file counts as ViT-H's 24 layers: -2 is its last).

        A per-call ``options={"layer": ...}`` is more specific and wins over this
        setting for that call; ``None`` goes back to the model's default layer.

        Raises:
            LayerError: ``layer_idx`` is outside the model's layers (checked now,
                and again at encode for ``options={"layer": ...}``).
        """
        if layer_idx is not None and self._encoders():
            layer_idx = self.check_layer(layer_idx)
        self.layer_idx = layer_idx

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs):
        """The tokenizer's ``tokenize_with_weights``: ``syntax=`` picks the dialect, and the
        dialect's own options go with it (``truncate_long_prompts=False`` with
        ``syntax="compel"``: compel's chunks instead of one truncated window).

        Raises:
            PromptError: see :meth:`textenc.prompts.tokenizer.SDTokenizer.tokenize_with_weights`.
        """
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)

    def _options(self, return_pooled, extra: Mapping | None) -> dict:
        # ComfyUI's encode_from_tokens starts with reset_clip_options(): options set on the
        # model itself (set_clip_options) do not outlive the next encode through the CLIP.
        reset = getattr(self.cond_stage_model, "reset_clip_options", None)
        if reset is not None:
            reset()
        options: dict[str, Any] = dict(extra or {})
        if self.layer_idx is not None:  # per-call options are more specific: they win
            options.setdefault("layer", self.layer_idx)
        if return_pooled == "unprojected":
            options["projected_pooled"] = False
        return options

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict: bool = False, *,
                           options: Mapping[str, Any] | None = None):
        """``cond`` [1, 77·windows, width] (and ``pooled`` with ``return_pooled``) of ``tokens``.

        ``options`` (e.g. ``{"layer": -2, "weight_mode": "a1111"}``) hold for this
        call only; its ``"layer"`` wins over :meth:`clip_layer`'s (the more specific).
        Without ``return_pooled`` or ``return_dict`` the model is told pooled is
        not needed (``need_pooled=False``), which spares compel's raw-text window.
        """
        out = self.cond_stage_model.encode_token_weights(tokens, options=self._options(return_pooled, options),
                                                         need_pooled=bool(return_pooled or return_dict))
        cond, pooled = out[0], out[1]
        if return_dict:
            result = {"cond": cond, "pooled_output": pooled}
            result.update(out[2] if len(out) > 2 else {})
            return result
        return (cond, pooled) if return_pooled else cond

    def encode_batch(self, tokens: Sequence[Mapping[str, list]], *, options: Mapping[str, Any] | None = None,
                     errors: str = "raise") -> list:
        """``(cond [1, 77·windows, width], pooled [1, P])`` of each of ``tokens`` (what :meth:`tokenize`
        returns), bit for bit as :meth:`encode_from_tokens` (``return_pooled=True``) of each alone,
        with one forward per text encoder for the prompts of equal window counts
        (:mod:`textenc.text_encoders.batch`).

        Args:
            options: as :meth:`encode_from_tokens`, for every prompt.
            errors: ``"raise"`` the first bad prompt's PromptError, or ``"return"`` the
                error in that prompt's place.

        Raises:
            PromptError: (``errors="raise"``) a bad prompt or weight.
        """
        return self.cond_stage_model.encode_token_weights_batch(list(tokens), options=self._options(True, options),
                                                                errors=errors)

    def empty_window(self, options: Mapping[str, Any] | None = None) -> torch.Tensor:
        """One window of the empty prompt's encoding, (77, width) (SDXL: L's and G's side by
        side), as the weighting and the padding of longer prompts use it. SD3, Flux and Wan:
        the family's whole empty-prompt cond (SD3 (154, 4096), Flux (256, 4096), Wan (512, 4096))."""
        return self.cond_stage_model.empty_window(self._options(True, options))

    def encode_from_tokens_scheduled(self, tokens, unprojected: bool = False, add_dict: Mapping[str, Any] | None = None,
                                     show_pbar: bool = True, *, options: Mapping[str, Any] | None = None) -> list:
        """CONDITIONING: ``[[cond, {"pooled_output": pooled, **add_dict}]]``, as ComfyUI's (its
        nodes call it so: ``CLIPTextEncodeFlux`` passes ``add_dict={"guidance": g}``).
        ``unprojected`` asks for the pooled output before the projection; ``show_pbar``
        is accepted for ComfyUI's signature (there is no schedule to show)."""
        result = self.encode_from_tokens(tokens, return_pooled="unprojected" if unprojected else True,
                                         return_dict=True, options=options)
        cond = result.pop("cond")
        result.update(add_dict or {})
        return [[cond, result]]

    def encode(self, text: str, *, syntax: str | None = None, options: Mapping[str, Any] | None = None,
               **tokenize_kwargs: Any):
        """``cond`` of ``text``; ``syntax`` picks the dialect and, unless ``options``
        names one, the ``weight_mode`` that goes with it (``a1111`` for ``"a1111"``).
        ``tokenize_kwargs`` go to :meth:`tokenize` (e.g. ``truncate_long_prompts=False``
        with ``syntax="compel"``)."""
        if syntax:
            tokenize_kwargs["syntax"] = syntax
        return self.encode_from_tokens(self.tokenize(text, **tokenize_kwargs),
                                       options=_syntax_options(syntax, options))

    def encode_scheduled(self, text: str, *, steps: int, syntax: str | None = None,
                         options: Mapping[str, Any] | None = None, split_and: bool = True,
                         **tokenize_kwargs: Any) -> list:
        """CONDITIONING for ``steps`` sampling steps: prompt editing, alternation and ``AND``.

        With ``syntax="a1111"``, ``[from:to:when]``, ``[a|b]`` and ``AND`` are
        read as AUTOMATIC1111 reads them; each text of a part's schedule is
        encoded as A1111 encodes it (all of one schedule in one batch).
        Returns ``[[cond, {"pooled_output", "start_percent", "end_percent",
        "strength"}], ...]``: for each ``AND`` part in order, one entry per
        change of its text, active while ``start_percent <= step / steps <
        end_percent`` (0-based step ``step``; A1111 uses a text up to and
        including its end step), ``strength`` the part's ``:weight``.
        Entries of one part have equal lengths; parts may differ. Dialects
        without editing give one entry over the whole range. ``split_and=False``
        reads ``AND`` as text (A1111's negative prompt). ``tokenize_kwargs`` go
        to the tokenizer (e.g. ``comma_padding_backtrack``, or compel's
        ``truncate_long_prompts``; another dialect's option at a value other
        than its default is a PromptError); ``options`` and the
        default ``weight_mode`` as :meth:`encode`. See :func:`conditioning_at_step`.

        Raises:
            PromptError: a bad syntax, ``steps`` or prompt.
        """
        opts = _syntax_options(syntax, options)
        dialect = get_dialect(syntax)
        _check_prompt_chars(self.tokenizer, text, dialect.name)  # before the schedule is read
        tokenize = lambda text: self.tokenize(text, True, syntax=syntax, **tokenize_kwargs)  # noqa: E731
        together = schedule_encoder(dialect.schedule_encoding)
        conditioning: list = []
        for weight, schedule in prompt_schedules(syntax, text, steps, split=split_and):
            texts = [t for _, t in schedule]
            if together is not None:
                encoded = together(self.cond_stage_model, tokenize, texts, self._options(True, opts))
            else:
                encoded = [self.encode_from_tokens(tokenize(t), return_pooled=True, options=opts) for t in texts]
            conditioning += _timed_entries(schedule, encoded, steps, weight)
        return conditioning

    def load_sd(self, sd, full_model: bool = False, *, strict: bool = True, require_finite: bool = True):
        return self.cond_stage_model.load_sd(sd, strict=strict, require_finite=require_finite)

    def get_sd(self) -> dict:
        return self.cond_stage_model.state_dict()


def _check_prompt_chars(tokenizer: Any, text: str, syntax: str) -> None:
    """Refuse ``text`` longer than the ``max_prompt_chars`` of any text tokenizer of
    ``tokenizer`` (an :class:`SDTokenizer` or a wrapper holding some)."""
    found = [tokenizer] if isinstance(tokenizer, SDTokenizer) else list(getattr(tokenizer, "tokenizers", {}).values())
    for sd_tokenizer in found:
        check_prompt_size(text, sd_tokenizer.parse_options, syntax)


def _syntax_options(syntax: str | None, options: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``options`` with the syntax's default ``weight_mode`` when they name none."""
    if syntax is None:
        return dict(options) if options else None
    return {"weight_mode": default_weight_mode(syntax), **(options or {})}


def _timed_entries(schedule: Sequence[tuple[int, str]], encoded: Sequence[tuple], steps: int,
                   weight: float) -> list:
    """ComfyUI entries of one schedule, over the steps :func:`~textenc.prompts.step_ranges.step_ranges` gives."""
    return [[encoded[r.index][0], {"pooled_output": encoded[r.index][1], "start_percent": r.start_percent,
                                   "end_percent": r.end_percent, "strength": weight}]
            for r in step_ranges(schedule, steps)]


def conditioning_at_step(conditioning: Sequence, step: int, steps: int) -> list[tuple]:
    """The ``(cond, pooled, strength)`` active at 0-based ``step`` of ``steps``: one per ``AND`` part.

    For :meth:`CLIP.encode_scheduled` output in a pipeline of your own. A1111
    combines the parts as ``uncond + cfg · Σ strength · (pred(cond) - uncond)``;
    ComfyUI averages them weighted by ``strength`` instead.
    """
    at = step / steps
    return [(cond, extra["pooled_output"], extra.get("strength", 1.0)) for cond, extra in conditioning
            if extra.get("start_percent", 0.0) <= at < extra.get("end_percent", 1.0)]


def build_clip(clip_type: str, weights: Mapping[str, Mapping[str, torch.Tensor]],
               configs: Mapping[str, Any], tokenizer_kwargs: Mapping[str, Mapping[str, Any]], *,
               sources: Mapping[str, str], embedding_directory=None, device="cpu",
               dtype: torch.dtype | None = None, strict: bool = True, require_finite: bool = True,
               model_kwargs: Mapping[str, Any] | None = None) -> CLIP:
    """Assemble a :class:`CLIP` from per-role HF-layout weights, text configs and tokenizer
    arguments (the roles of the family ``clip_type``: ``l`` for SD1, ``h`` for SD2, ``l`` + ``g``
    for SDXL, ``l`` + ``g`` + ``t5xxl`` for SD3, ...; see :mod:`textenc.text_encoders.families`).
    A family that may be loaded in part (SD3) builds the roles ``weights`` has; its
    tokenizer always has every role.

    Each text model takes its start/end/pad ids from its tokenizer, so a tokenizer
    with another pad token (``tokenizer_kwargs``) builds the matching empty prompt.
    ``model_kwargs`` go to the family wrapper's ``for_roles`` (SD3's ``width_without_t5``).

    Raises:
        CheckpointError: an unknown ``clip_type``.
        TextencError: weights that do not fit a config (the loader's own error
            type, its message prefixed with that role's source).
    """
    family = get_family(clip_type)
    present = [role for role in family.role_names if role in weights]
    model = family.model_class.for_roles({role: configs[role] for role in present}, device=device, dtype=dtype,
                                         **dict(model_kwargs or {}))
    tokenizer = family.tokenizer_class.for_roles({role: tokenizer_kwargs.get(role, {}) for role in family.role_names},
                                                 embedding_directory=embedding_directory)
    for role in present:
        encoder, encoder_tokenizer = model.encoders[role], tokenizer.tokenizers[role]
        encoder.special_tokens = {"start": encoder_tokenizer.start_token, "end": encoder_tokenizer.end_token,
                                  "pad": encoder_tokenizer.pad_token}
        try:
            encoder.load_sd(weights[role], strict=strict, require_finite=require_finite)
        except TextencError as exc:  # same error type, naming the file it came from
            raise type(exc)(f"{sources[role]}: {exc}") from exc
    return CLIP(model, tokenizer, clip_type=clip_type)


def _build(family: Family, encoders: Mapping[str, FoundTextEncoder], *, embedding_directory, device,
           dtype, tokenizer_kwargs: Mapping[str, Any], text_configs: Mapping[str, Any],
           strict: bool, require_finite: bool) -> CLIP:
    found = {role.name: encoders[role.encoder] for role in family.roles if role.encoder in encoders}
    configs = {role.name: role_config(role, found[role.name], text_configs) for role in family.roles
               if role.name in found}
    kwargs = {role.name: tokenizer_arguments(role, found.get(role.name), tokenizer_kwargs.get(role.name, {}))
              for role in family.roles}
    return build_clip(family.name, {role: found[role].state_dict for role in found}, configs, kwargs,
                      sources={role: found[role].source for role in found},
                      embedding_directory=embedding_directory, device=device, dtype=dtype,
                      strict=strict, require_finite=require_finite)


def detect_clip_type(names: Sequence[str]) -> str:
    """The registered family whose roles take exactly the detected encoders ``names``:
    ``"sd1"`` for L alone, ``"sd2"`` for H alone, ``"sdxl"`` for L + G.

    Raises:
        CheckpointError: no family does.
    """
    return family_for_encoders(names).name


def _released_depths() -> dict[str, int]:
    """Encoder kind → the released depth a file one layer short of is numbered as (ViT-H: 24)."""
    return {role.encoder: role.released_model[1] for family in families() for role in family.roles
            if role.released_model is not None}


def load_clip(ckpt_paths: Sequence[str | os.PathLike] | str | os.PathLike, embedding_directory=None,
              clip_type: str | None = None, *, device="cpu", dtype: torch.dtype | None = None,
              state_dicts: Sequence[tuple[str, Mapping]] | None = None,
              tokenizer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
              text_configs: Mapping[str, Any] | None = None, strict: bool = False,
              require_finite: bool = True, allow_missing_layers: bool = False) -> CLIP:
    """Load text encoders from checkpoint files (full SD1/SD2/SDXL/SD3 checkpoints,
    standalone clip_l / clip_g / ViT-H files in any known key layout, T5-XXL and UMT5-XXL
    files in every format of docs/t5.md: safetensors, fp8, scaled fp8, GGUF, diffusers
    folders) into a :class:`CLIP`.

    Args:
        ckpt_paths: one path or several (SDXL: clip_l and clip_g files; SD3: clip_l,
            clip_g and t5xxl; Flux: clip_l and t5xxl).
        embedding_directory: textual-inversion folder(s).
        clip_type: a registered family (``"sd1"``, ``"sd2"``, ``"sdxl"``, ``"sd3"``,
            ``"flux"``, ``"wan"``) or None/``"auto"`` to detect it from the keys
            (:func:`textenc.text_encoders.selection.detect_family`). SD3 takes any
            subset of its encoders, as ComfyUI.
        dtype: storage dtype; None keeps the file's (memory-mapped, no copy, except
            tensors stored at offsets that are not 64-byte aligned).
        state_dicts: already-loaded ``(source, state_dict)`` pairs instead of paths.
        tokenizer_kwargs: per-role extra tokenizer arguments (``{"l": {...}}``).
        text_configs: per-role text configs (name, path, dict) overriding the
            config read from shapes (needed for non-standard head counts).
        strict: refuse keys below a text encoder's prefix that match no weight,
            and keys the model does not have (default: ignore them with a
            ``CheckpointWarning``, as ComfyUI); missing and mis-shaped keys
            are always refused.
        require_finite: refuse text-encoder weights holding NaN or infinite
            values, naming the tensor (a sum per tensor: 0.05–0.2 s for CLIP-L,
            0.3–1.3 s for CLIP-G on one CPU thread; see the README).
        allow_missing_layers: load an L/H/G encoder that has fewer layers than
            the released model (12/24/32) as a shallower model, instead of
            refusing it. A gap in the layer numbers is always refused.

    Raises:
        CheckpointError: unreadable file, no or unexpected text encoders (a T5 file where
            CLIP-L is expected, UMT5 for Flux, ...), a UMT5 file without its tokenizer
            and none given, bad or missing keys or layers, integer or non-finite weights.
    """
    family = None if clip_type in (None, "auto") else get_family(clip_type)
    options = dict(roles=family.encoder_kinds if family else None, strict=strict,
                   allow_missing_layers=allow_missing_layers, released_depths=_released_depths(),
                   require_finite=require_finite)
    if state_dicts is None:
        paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
        encoders = load_text_encoder_files(paths, **options)
    else:
        encoders = load_text_encoder_state_dicts(state_dicts, **options)
    family = check_family(family, encoders, clip_type) if family is not None else detect_family(encoders)
    return _build(family, encoders, embedding_directory=embedding_directory, device=device,
                  dtype=dtype, tokenizer_kwargs=tokenizer_kwargs or {},
                  text_configs=text_configs or {}, strict=strict, require_finite=require_finite)
