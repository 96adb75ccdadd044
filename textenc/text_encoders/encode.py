"""The work behind :class:`textenc.text_encoders.sd1_clip.SDClipModel`: loading, token processing
and batched encoding; the weight maths is :mod:`textenc.text_encoders.weighting`'s, one
module per ``weight_mode``. Kept apart so each function stays small.
"""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple, Sequence

import torch

from ..errors import CheckpointError, CheckpointWarning, EmbeddingWarning, EncodeError, PromptError, TextencError
from ..loading.checkpoint import aligned, is_finite
from ..nn.packed import PackedWeight
from ..warn import warn_at_caller
from .options import ClipOptions
# token_weights is re-exported: callers outside (the dataset encoder) read it here.
from .weighting import EncoderCalls, get_weight_mode, token_weights  # noqa: F401

# An ``SDClipModel`` (duck-typed: ``sd1_clip`` imports this module, never the reverse).
SDClipModel = Any

# Not weights: old HF files store the position ids buffer; it is recomputed.
IGNORED_KEYS = ("text_model.embeddings.position_ids",)
PROJECTION_KEY = "text_projection.weight"


class ProcessedTokens(NamedTuple):
    embeds: torch.Tensor          # (W, T, D) input embeddings in the compute dtype
    attention_mask: torch.Tensor  # (W, T) 1 up to and including the first end token
    num_tokens: list[int]         # per window: sum of the mask (pooled at num_tokens - 1)


# ---- loading ------------------------------------------------------------------

def _shape_report(model: SDClipModel, sd: dict) -> tuple[list, list, list]:
    expected = {k: tuple(v.shape) for k, v in model.transformer.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted((k, expected[k], tuple(sd[k].shape)) for k in set(expected) & set(sd)
                       if tuple(sd[k].shape) != expected[k])
    return missing, unexpected, misshaped


def check_weight_values(sd: dict, *, require_finite: bool = True) -> None:
    """Refuse non-floating tensors and (``require_finite``) NaN or infinite values, naming the tensor.

    The finite scan sums each tensor (see :func:`textenc.loading.checkpoint.is_finite`):
    0.05–0.2 s for CLIP-L and 0.3–1.3 s for SDXL's CLIP-G on one loaded CPU
    thread (``bench/bench_weight_scan.py``), so it runs by default.
    """
    for key, tensor in sd.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {tensor.dtype}, but text-encoder weights are "
                                  "floating point; the file is corrupt or not a text encoder")
        if require_finite and not is_finite(tensor):
            raise CheckpointError(f"tensor {key!r} holds NaN or infinite values; the file is corrupt or was "
                                  "saved from a diverged training run; use another copy (require_finite=False "
                                  "loads it anyway, and every encode will then fail its finite check)")


def _placed(model: SDClipModel, sd: dict) -> dict:
    """``sd`` on the model's device in its storage dtype, packed weights (fp8 scaled, GGUF:
    :class:`~textenc.nn.packed.PackedWeight`) left as they are.

    Only the weights a forward uses as they are (already in the compute dtype) are made
    64-byte aligned (:func:`textenc.loading.checkpoint.aligned`), so that bits do not
    depend on the file's layout; a weight in another dtype is cast (or decoded) per call
    into a fresh, aligned tensor, and aligning it here would copy the whole file into
    memory (a T5-XXL fp16 file: 9 GB).
    """
    target, compute = model.storage_dtype, model.options_default.compute_dtype
    placed = {k: v if isinstance(v, PackedWeight) else v.to(device=model.device, dtype=target or v.dtype)
              for k, v in sd.items()}
    used_as_is = {k: v for k, v in placed.items() if v.dtype == compute and not isinstance(v, PackedWeight)}
    return {**placed, **aligned(used_as_is)}


def load_text_state_dict(model: SDClipModel, sd, *, strict: bool = True, require_finite: bool = True):
    """Assign an HF-layout state dict to ``model.transformer`` (see ``SDClipModel.load_sd``).

    ``strict=False`` tolerates unexpected keys only: a missing key always raises,
    because init-free layers would otherwise hold garbage. Integer weights are
    refused, and so (``require_finite``) are NaN or infinite values.
    """
    sd = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    width = model.config.hidden_size
    if PROJECTION_KEY not in sd and model.config.projection_dim == width:
        # SD1 checkpoints carry no projection; identity keeps pooled = unprojected.
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
        sd[PROJECTION_KEY] = torch.eye(width, dtype=dtype)
    missing, unexpected, misshaped = _shape_report(model, sd)
    if missing or misshaped or (strict and unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {missing[:8]}")
        if misshaped:
            parts.append("wrong shape: " + ", ".join(f"{k} expected {e} got {g}" for k, e, g in misshaped[:8]))
        if strict and unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {unexpected[:8]}")
        raise CheckpointError(f"text encoder state dict does not match the "
                              f"{model.config.num_hidden_layers}-layer, width-{width} config: "
                              + "; ".join(parts) + ". Check the model type/config, or pass strict=False "
                              "to ignore unexpected keys.")
    if unexpected:  # strict=False: ignored, and said so (ComfyUI logs them too)
        warn_at_caller(f"text encoder state dict: {len(unexpected)} unexpected key(s) ignored "
                       f"(strict=False): {unexpected[:8]}", CheckpointWarning)
    sd = {k: v for k, v in sd.items() if k not in unexpected}
    check_weight_values(sd, require_finite=require_finite)
    sd = _placed(model, sd)
    keys = model.transformer.load_state_dict(sd, strict=True, assign=True)
    if model.freeze:
        model.transformer.requires_grad_(False)
        model.transformer.eval()
    model.loaded = True
    model.clear_caches()
    # torch's (missing_keys, unexpected_keys) named tuple, reporting the keys ignored above.
    return keys._replace(unexpected_keys=list(unexpected))


# ---- token processing -----------------------------------------------------------

def _window_mask(window: Sequence[Any], special: dict) -> list[int]:
    """ComfyUI's mask: 1 up to and including the first end token (or pad, when the
    model has no end token, which is then itself masked), 0 after; embeddings 1."""
    end = special.get("end")
    compare = end if end is not None else special.get("pad", -1)
    mask, seen_end = [], False
    for token in window:
        if isinstance(token, torch.Tensor):
            mask.append(1)
            continue
        mask.append(0 if seen_end else 1)
        if not seen_end and int(token) == compare:
            if end is None:
                mask[-1] = 0
            seen_end = True
    return mask


def _drop_wrong_width(window: list, width: int, pad: int) -> list:
    """Remove embedding vectors of the wrong width, padding at the end (as ComfyUI)."""
    kept = [t for t in window if not (isinstance(t, torch.Tensor) and t.shape[-1] != width)]
    if len(kept) < len(window):
        warn_at_caller(f"{len(window) - len(kept)} embedding vector(s) of the wrong width "
                       f"(expected {width}) were dropped", EmbeddingWarning)
    return kept + [pad] * (len(window) - len(kept))


def _check_vocabulary(ids: torch.Tensor, vocab_size: int) -> None:
    """A token id the embedding table does not have is a tokenizer/model mismatch, not an IndexError."""
    if ids.numel() and int(ids.max()) >= vocab_size:
        window, position = (int(i) for i in (ids >= vocab_size).nonzero()[0])
        raise CheckpointError(f"token id {int(ids[window, position])} is outside the text encoder's vocabulary "
                              f"of {vocab_size} tokens (window {window}, position {position}): the tokenizer and "
                              "the model do not match (a tiny or mismatched text encoder, or another model's "
                              "special tokens); use the model's own tokenizer or a checkpoint with the full "
                              "vocabulary (49408 for CLIP)")


_ID_LIMIT = 2 ** 63  # ids are stored as int64


def _check_token(token: Any, window: int, position: int) -> None:
    """Refuse a token that is neither an int id in ``[0, 2**63)`` nor a 1-D embedding vector."""
    where = f"token window {window}, position {position}"
    if isinstance(token, torch.Tensor):
        if token.ndim != 1:
            raise PromptError(f"{where}: an embedding vector must be a 1-D tensor, got shape {tuple(token.shape)}")
    elif not isinstance(token, numbers.Integral):
        raise PromptError(f"{where}: a token must be an int id or an embedding vector, got "
                          f"{type(token).__name__} {token!r:.40}")
    elif not 0 <= int(token) < _ID_LIMIT:
        raise PromptError(f"{where}: token id {int(token)} is not a vocabulary index (ids are 0 or more, "
                          "and below 2**63)")


def check_windows(windows: Sequence[Sequence[Any]], max_positions: int | None) -> None:
    """Refuse hand-built token windows the encoder cannot take, naming the window and position.

    Windows must hold 1 to ``max_positions`` tokens (any number when None: T5's relative
    positions have no table to run past), all the same length; each token an int id or a
    1-D embedding vector. A window of plain ints is checked in one pass.

    Raises:
        PromptError: naming the window (and the position) at fault.
    """
    if not windows:
        raise PromptError("there are no token windows to encode")
    length = len(windows[0])
    for index, window in enumerate(windows):
        if len(window) != length:
            raise PromptError(f"token windows must have equal lengths: window {index} has {len(window)} "
                              f"tokens, window 0 has {length}")
        if set(map(type, window)) == {int} and min(window) >= 0 and max(window) < _ID_LIMIT:
            continue  # the common case: plain int ids
        for position, token in enumerate(window):
            _check_token(token, index, position)
    if length == 0 or (max_positions is not None and length > max_positions):
        limit = "at least 1" if max_positions is None else f"1 to {max_positions} (its position count)"
        raise PromptError(f"token windows hold {length} tokens, but the text encoder takes {limit}; "
                          "tokenize with the model's own tokenizer")


def process_tokens(model: SDClipModel, windows: Sequence[Sequence[Any]],
                   dtype: torch.dtype) -> ProcessedTokens:
    """Token windows (ints or 1-D tensors) → input embeddings, masks and token counts.

    Raises:
        PromptError: a malformed window (see :func:`check_windows`).
        CheckpointError: a token id beyond the model's vocabulary.
    """
    check_windows(windows, getattr(model.config, "max_position_embeddings", None))
    width = model.config.hidden_size
    pad = model.special_tokens["pad"]
    windows = [_drop_wrong_width(list(w), width, pad) for w in windows]
    device = model.device
    ids = torch.tensor([[pad if isinstance(t, torch.Tensor) else int(t) for t in w] for w in windows],
                       dtype=torch.long, device=device)
    _check_vocabulary(ids, model.config.vocab_size)
    embeds = model.transformer.get_input_embeddings()(ids, out_dtype=dtype)
    for row, window in enumerate(windows):
        for column, token in enumerate(window):
            if isinstance(token, torch.Tensor):
                embeds[row, column] = token.to(device=device, dtype=dtype)
    masks = [_window_mask(w, model.special_tokens) for w in windows]
    return ProcessedTokens(embeds, torch.tensor(masks, dtype=torch.long, device=device),
                           [sum(m) for m in masks])


# ---- encoding -----------------------------------------------------------------

def _run_transformer(model: SDClipModel, processed: ProcessedTokens, opts: ClipOptions,
                     attention_mask: torch.Tensor | None, row_groups: Sequence[int],
                     empty_alongside: Sequence[bool]):
    if opts.layer == "all":
        intermediate = "all"
    elif opts.layer == "hidden":  # ComfyUI's index → the loaded layers' own (23-layer SD2)
        intermediate = model.numbering.model_index(opts.layer_idx)
    else:
        intermediate = None
    # fast_pooled: the one-row tail, caption by caption (row_groups) so a batch keeps each alone's bits
    fast = {"fast_pooled": True, "row_groups": row_groups} if opts.fast_pooled else {}
    with torch.no_grad():
        out = model.transformer(None, attention_mask, embeds=processed.embeds,
                                num_tokens=processed.num_tokens, intermediate_output=intermediate,
                                final_layer_norm_intermediate=opts.layer_norm_hidden_state,
                                dtype=opts.compute_dtype,
                                return_last_hidden=opts.layer in ("last", "pooled"), **fast)
        pooled = out.pooled_output
        if opts.return_projected_pooled and pooled is not None:
            pooled = model.transformer.project_pooled(pooled, row_groups, empty_alongside)
    z = out.last_hidden_state if opts.layer in ("last", "pooled") else out.intermediate
    return z.float(), (None if pooled is None else pooled.float())  # T5 has no pooled output


def _likely_cause(model: SDClipModel, windows, opts: ClipOptions) -> str:
    """Name why an encode was not finite: model weights, an embedding vector, or the compute dtype."""
    for key, tensor in model.transformer.state_dict().items():
        if tensor.is_floating_point() and not is_finite(tensor):
            return (f"the model weights: tensor {key!r} holds NaN or infinite values (it was loaded with "
                    "require_finite=False); load another copy of the checkpoint")
    vectors = [t for w in windows for t in w if isinstance(t, torch.Tensor)]
    largest = max((float(v.float().abs().max()) for v in vectors), default=0.0)
    if vectors and (largest > 2.0 ** 14 or not all(is_finite(v) for v in vectors)):
        return (f"an embedding vector (largest |value| {largest:.3g}); embedding files are refused above "
                "2**14 when loaded by the tokenizer, so this one was built by hand")
    held = f" (an embedding vector's largest |value| is {largest:.3g})" if vectors else ""
    return f"the encoder overflowed in compute dtype {opts.compute_dtype}{held}; encode in torch.float32"


def check_finite_output(model: SDClipModel, windows, z: torch.Tensor, pooled: torch.Tensor,
                        opts: ClipOptions) -> None:
    """Raise :class:`~textenc.errors.EncodeError` when an encode is not finite, naming the likely cause.

    The check is one sum per output (cheap next to the forward); the cause is
    only looked for once it failed.
    """
    if is_finite(z) and (pooled is None or is_finite(pooled)):
        return
    raise EncodeError(f"the text encoder returned NaN or infinite values; likely cause: "
                      f"{_likely_cause(model, windows, opts)}")


def encode_windows(model: SDClipModel, windows, opts: ClipOptions, *,
                   extra_mask: torch.Tensor | None = None, row_groups: Sequence[int] | None = None,
                   empty_alongside: Sequence[bool] | bool = False):
    """Encode windows in one forward → ``(z (W, T, D), pooled (W, P)[, extra])``.

    Every layer runs on every row, as ComfyUI runs them, so pooled at an
    intermediate layer is ComfyUI's bit for bit. ``row_groups`` (window counts
    summing to W: the windows of each prompt in a batch of prompts) and
    ``empty_alongside`` (per group, or one value for all: whether ComfyUI would
    encode the empty prompt in the same batch, as it does for weighted windows)
    project each prompt's pooled rows as ComfyUI projects them
    (:meth:`textenc.nn.clip_model.CLIPTextModel.project_pooled`).
    """
    if not model.loaded:
        raise CheckpointError("the text encoder has no weights yet: call load_sd(state_dict) first")
    processed = process_tokens(model, windows, opts.compute_dtype)
    mask = processed.attention_mask if model.enable_attention_masks else None
    if extra_mask is not None:
        mask = extra_mask if mask is None else mask * extra_mask
    groups = [len(windows)] if row_groups is None else list(row_groups)
    alongside = [empty_alongside] * len(groups) if isinstance(empty_alongside, bool) else list(empty_alongside)
    z, pooled = _run_transformer(model, processed, opts, mask, groups, alongside)
    check_finite_output(model, windows, z, pooled, opts)
    if model.zero_out_masked:
        z = z * processed.attention_mask.unsqueeze(-1).to(z.dtype)
    if model.return_attention_masks:
        return z, pooled, {"attention_mask": processed.attention_mask}
    return z, pooled


def _token_key(token: Any) -> Any:
    if isinstance(token, torch.Tensor):
        return ("embedding", str(token.dtype), token.detach().cpu().numpy().tobytes())
    return int(token)


def empty_encoding(model: SDClipModel, length: int, opts: ClipOptions):
    """The empty prompt's ``(z (T, D), pooled (P,))``, cached per options and length."""
    tokens = model.gen_empty_tokens(model.special_tokens, length)
    compute = lambda: tuple(None if x is None else x[0]  # noqa: E731
                            for x in encode_windows(model, [tokens], opts)[:2])
    return model.empty_cache.get_or_compute((opts, length), compute)


def _encode_maybe_cached(model: SDClipModel, windows, opts: ClipOptions, empty_alongside: bool = False):
    encode = lambda: encode_windows(model, windows, opts, empty_alongside=empty_alongside)  # noqa: E731
    if model.cache_size <= 0 or model.return_attention_masks:
        return encode()
    check_windows(windows, getattr(model.config, "max_position_embeddings", None))  # before the key reads the tokens
    key = (opts, empty_alongside, tuple(tuple(_token_key(t) for t in w) for w in windows))
    z, pooled = model.encode_cache.get_or_compute(key, encode)
    # Copies: the result may be a view the caller mutates; the entry must stay intact.
    return z.clone(), (None if pooled is None else pooled.clone())


def encoder_calls(model: SDClipModel, opts: ClipOptions) -> EncoderCalls:
    """The forwards a weight mode may run on ``model`` with ``opts``."""
    return EncoderCalls(
        encode=lambda windows, mask: encode_windows(model, windows, opts, extra_mask=mask),
        encode_cached=lambda windows, empty_alongside=False: _encode_maybe_cached(model, windows, opts,
                                                                                  empty_alongside),
        empty=lambda length: empty_encoding(model, length, opts)[0],
        special_tokens=model.special_tokens)


def check_weighted(z: torch.Tensor, weights: torch.Tensor) -> None:
    """Raise EncodeError when weighting made the conditioning NaN or infinite."""
    if not is_finite(z):
        raise EncodeError(f"the weighted conditioning is NaN or infinite: a prompt weight (largest "
                          f"|weight| {float(weights.abs().max()):.3g}) overflowed float32 when it scaled the "
                          "encoder output; use smaller weights (ComfyUI would return this NaN/Inf conditioning)")


def _bad_pair(pairs: Sequence[Sequence[Any]]) -> str | None:
    """What is wrong with the first malformed window or pair, or None."""
    for index, window in enumerate(pairs):
        if len(window) != len(pairs[0]):
            return (f"token windows must have equal lengths: window {index} has {len(window)} tokens, "
                    f"window 0 has {len(pairs[0])}")
        for position, pair in enumerate(window):
            where = f"token window {index}, position {position}"
            if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3):
                return f"{where}: expected (token, weight) or (token, weight, word_id), got {pair!r:.60}"
            if not isinstance(pair[1], numbers.Real):
                return f"{where}: the weight must be a number, got {pair[1]!r:.40}"
            if len(pair) == 3 and not isinstance(pair[2], numbers.Integral):
                return f"{where}: the word id must be an int, got {pair[2]!r:.40}"
    return None


def pair_weights(pairs: Sequence[Sequence[Any]], normalization: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`~textenc.text_encoders.weighting.token_weights` of hand-built windows, refusing
    malformed ones with a :class:`~textenc.errors.PromptError` naming the window and position
    (looked for only once the conversion failed: no cost for valid windows)."""
    try:
        return token_weights(pairs, normalization)
    except TextencError:
        raise
    except (TypeError, ValueError, IndexError) as error:
        raise PromptError(_bad_pair(pairs) or f"malformed token windows: {error}") from None


def encode_token_weights(model: SDClipModel, token_weight_pairs, opts: ClipOptions, *,
                         need_pooled: bool = True):
    """ComfyUI's ``encode_token_weights`` (see :mod:`textenc.text_encoders.weighting` for modes).

    ``need_pooled=False`` (the caller discards the pooled output) returns None
    in its place and skips the work done only for it: compel's raw-text window.
    """
    try:
        pairs = [list(w) for w in token_weight_pairs]
    except TypeError:
        raise PromptError(f"token windows must be lists of (token, weight) pairs, got "
                          f"{token_weight_pairs!r:.80}") from None
    if not pairs:
        z_empty, pooled_empty = empty_encoding(model, model.max_length, opts)
        # Copies: the cached empty encoding weights every later prompt.
        return z_empty.unsqueeze(0).clone(), (pooled_empty.unsqueeze(0).clone()
                                              if need_pooled and pooled_empty is not None else None)
    weights, word_ids = pair_weights(pairs, opts.normalization)
    mode = get_weight_mode(opts.weight_mode)
    result = mode.encode(pairs, weights, word_ids, encoder_calls(model, opts), need_pooled=need_pooled)
    check_weighted(result[0], weights)
    return result
