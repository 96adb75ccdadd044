"""Targets 1-3 (and the GPU part of 8): CLIP text forward against transformers.

1. fp32 forward, CLIP-L (sd1_clip_config) and OpenCLIP ViT-H (sd2_clip_config),
   batch 1/4/16 x 77 tokens: <= 1.0x transformers ``CLIPTextModel`` (SDPA, same
   random weights) and <= 1.15x a floor of only the linear layers (q, k, v, out,
   fc1, fc2 per layer, ``F.linear`` on the same shapes and weights).
2. Clip skip: penultimate layer (+ pooled from the last) <= 0.95x full depth.
3. bf16 compute >= 2x faster than fp32; fp16-stored weights computing in fp32
   <= 1.1x fp32-stored weights (per-forward cast, and the opt-in cached cast).
"""

from __future__ import annotations

import contextlib
import functools
import statistics

import torch
import torch.nn.functional as F

try:
    from . import common
except ImportError:  # run as a script from bench/
    import common

TOKENS = 77
CONFIGS = {"sd1_clip_config": "CLIP-L", "sd2_clip_config": "ViT-H"}


def _ids(batch: int, prompt_tokens: int = TOKENS - 1, *, seed: int = 0, pad: int = 49407) -> torch.Tensor:
    """(B, 77) ids: BOS, random words, EOS at ``prompt_tokens``, then padding."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49406, (batch, TOKENS), generator=generator)
    ids[:, 0] = 49406
    ids[:, prompt_tokens] = 49407
    ids[:, prompt_tokens + 1:] = pad
    return ids


def _linear_floor(model, batch: int):
    """Only the six projections of every layer, on (B, 77, D) inputs."""
    layers = model.text_model.encoder.layers
    width = layers[0].self_attn.out_proj.weight.shape[0]
    x = torch.randn(batch, TOKENS, width)
    projections = [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.out_proj) for layer in layers]
    mlps = [layer.mlp for layer in layers]

    def run():
        for attention, mlp in zip(projections, mlps):
            for p in attention:
                F.linear(x, p.weight, p.bias)
            F.linear(F.linear(x, mlp.fc1.weight, mlp.fc1.bias), mlp.fc2.weight, mlp.fc2.bias)
    return run


@functools.cache
def _hf_model(config: str):
    """transformers' model of ``config`` with the run's random weights, built once per run."""
    return common.hf_text_model(config)


def _state_dict(config: str) -> dict[str, torch.Tensor]:
    """Those weights in our key layout (the tensors are the HF model's own, not copies)."""
    return common.hf_text_state_dict(_hf_model(config))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _target1(config: str, batches, repeats: int) -> list[dict]:
    rows = []
    hf = _hf_model(config)
    ours = common.ours_text_model(config, _state_dict(config))
    name = CONFIGS[config]
    for batch in batches:
        ids = _ids(batch)
        with torch.inference_mode():
            out, ref = ours(ids), hf(ids)
            diff = max(_max_diff(out.last_hidden_state, ref.last_hidden_state),
                       _max_diff(out.pooled_output, ref.pooler_output))
            # Small batches are cheap and the noisiest: more rounds for them; batch 16
            # twice as many too (5 rounds let one slow stretch decide its median).
            rounds = repeats * {1: 3, 4: 2, 16: 2}.get(batch, 1)
            stats = common.interleaved({"ours": lambda: ours(ids), "hf": lambda: hf(ids),
                                        "floor": _linear_floor(ours, batch)}, repeats=rounds)
        parity = f"max|ours-hf|={diff:.1e}" + ("" if diff <= 1e-5 else " PARITY FAIL")
        hf_row = common.ratio_row("1 fwd fp32 vs HF", f"{name} B{batch}", stats["ours"], stats["hf"],
                                  1.0, ref_label="HF", note=parity)
        hf_row["passed"] = hf_row["passed"] and diff <= 1e-5
        rows.append(hf_row)
        rows.append(common.ratio_row("1 fwd fp32 vs linear floor", f"{name} B{batch}", stats["ours"],
                                     stats["floor"], 1.15, ref_label="floor",
                                     note=f"HF/floor={stats['hf'].median / stats['floor'].median:.2f}"))
    return rows


@contextlib.contextmanager
def _without(model, part: str):
    """Temporarily replace attention or the activation by the identity (ablation only)."""
    from textenc.nn import attention
    layers = model.text_model.encoder.layers
    saved_backends = dict(attention.ATTENTION_BACKENDS)
    saved_activations = [layer.mlp.activation_ for layer in layers]
    try:
        if part == "attention":
            for name in attention.ATTENTION_BACKENDS:
                attention.ATTENTION_BACKENDS[name] = lambda q, k, v, heads, mask=None, causal=False: v
        else:
            for layer in layers:
                layer.mlp.activation_ = lambda h: h
        yield
    finally:
        attention.ATTENTION_BACKENDS.update(saved_backends)
        for layer, activation in zip(layers, saved_activations):
            layer.mlp.activation_ = activation


def _gap_breakdown(config: str, batch: int, repeats: int) -> list[dict]:
    """Where the distance to the linear floor goes: the forward minus its attention
    (the automatic CPU choice, bmm), minus its activation. Their savings are those ops' in-model cost."""
    ours = common.ours_text_model(config, _state_dict(config))
    ids = _ids(batch)

    def ablated(part):
        def run():
            with _without(ours, part):
                ours(ids)
        return run

    with torch.inference_mode():
        stats = common.interleaved({"full": lambda: ours(ids), "attention": ablated("attention"),
                                    "activation": ablated("activation"),
                                    "floor": _linear_floor(ours, batch)}, repeats=repeats)
    # Per-round differences in CPU time (each round runs all four back to back,
    # so slow drifts of this shared machine cancel), then the median over rounds.
    cpu = {k: v.cpu for k, v in stats.items()}
    rounds = range(len(cpu["floor"]))
    share = {k: statistics.median((cpu["full"][i] - cpu[k][i]) / cpu["floor"][i] for i in rounds)
             for k in ("attention", "activation")}
    full = statistics.median(cpu["full"][i] / cpu["floor"][i] for i in rounds)
    note = (f"cpu time / floor, median of paired rounds: full {full:.3f}; attention (bmm) "
            f"{share['attention']:.1%} of the floor, activation {share['activation']:.1%}; "
            f"everything else {full - 1 - sum(share.values()):.1%}")
    return [common.row("1 floor gap breakdown", f"{CONFIGS[config]} B{batch}",
                       stats["full"].fmt(), "floor " + stats["floor"].fmt(), full, "(info)", None,
                       note)]


def _target2(config: str, repeats: int) -> list[dict]:
    from textenc.nn.attention import optimized_attention_for_device

    ours = common.ours_text_model(config, _state_dict(config))
    layers = ours.text_model.config.num_hidden_layers
    ids = _ids(1, prompt_tokens=16, pad=ours.text_model.config.pad_token_id)  # a 15-word prompt
    # The pooled row still needs the last layer for that one row: its k/v up to
    # the row and q/MLP for the row alone. At batch 1 that is bound by reading
    # the layer's weights (28 MB for CLIP-L), so it is timed too, to state the
    # bound the measurement can reach: (full - one layer + that row's layer) / full.
    last = ours.text_model.encoder.layers[-1]
    width = last.self_attn.out_proj.weight.shape[0]
    hidden = torch.randn(1, TOKENS, width)
    attention = optimized_attention_for_device("cpu", small_input=True, dtype=hidden.dtype,
                                               tokens=TOKENS)
    pooled_row = torch.tensor([16])
    with torch.inference_mode():
        stats = common.interleaved({
            "penultimate": lambda: ours(ids, intermediate_output=-2, return_last_hidden=False, fast_pooled=True),
            "full": lambda: ours(ids),
            "layer": lambda: last(hidden, None, attention, causal=True),
            "row": lambda: last(hidden, None, attention, rows=pooled_row, causal=True),
        }, repeats=repeats)
    full, layer, row = (statistics.median(stats[k].cpu) for k in ("full", "layer", "row"))
    note = (f"{layers} layers: skipping 1 of {layers} bounds the ratio at >= {(layers - 1) / layers:.3f}; "
            f"with the pooled row's last layer ({row * 1e3:.1f} ms cpu vs {layer * 1e3:.1f} ms for "
            f"the whole layer) >= {(full - layer + row) / full:.3f}")
    return [common.ratio_row("2 clip skip (penultimate vs full)", f"{CONFIGS[config]} B1",
                             stats["penultimate"], stats["full"], 0.95, ref_label="full", note=note)]


def _target3(config: str, batch: int, repeats: int) -> list[dict]:
    from textenc.nn import ops

    state_dict = _state_dict(config)
    name = CONFIGS[config]
    ids = _ids(batch)
    fp32 = common.ours_text_model(config, state_dict)
    bf16 = common.ours_text_model(config, state_dict, dtype=torch.bfloat16)
    fp16_cast = common.ours_text_model(config, state_dict, dtype=torch.float16, cast=True)
    fp16_cached = ops.cache_weight_casts(
        common.ours_text_model(config, state_dict, dtype=torch.float16, cast=True))
    with torch.inference_mode():
        reference = fp32(ids).last_hidden_state
        bf16_diff = _max_diff(bf16(ids, dtype=torch.bfloat16).last_hidden_state.float(), reference)
        fp16_diff = _max_diff(fp16_cast(ids).last_hidden_state, reference)
        stats = common.interleaved({
            "fp32": lambda: fp32(ids),
            "bf16": lambda: bf16(ids, dtype=torch.bfloat16),
            "fp16w_cast": lambda: fp16_cast(ids),
            "fp16w_cached": lambda: fp16_cached(ids)}, repeats=repeats)
    bf16_note = f"max|bf16-fp32|={bf16_diff:.3f} (hidden, |x|max={reference.abs().max():.1f})"
    if not common.has_bf16_cpu():
        bf16_note += "; CPU lacks avx512_bf16/amx: bf16 is emulated"
    return [
        common.ratio_row("3 bf16 compute speed-up", f"{name} B{batch}", stats["bf16"], stats["fp32"],
                         2.0, ref_label="fp32", note=bf16_note, higher_is_better=True),
        common.ratio_row("3 fp16 weights -> fp32 (cast per forward)", f"{name} B{batch}",
                         stats["fp16w_cast"], stats["fp32"], 1.1, ref_label="fp32 weights",
                         note=f"default manual_cast; max|dev|={fp16_diff:.1e}"),
        common.ratio_row("3 fp16 weights -> fp32 (cached cast, opt-in)", f"{name} B{batch}",
                         stats["fp16w_cached"], stats["fp32"], 1.1, ref_label="fp32 weights",
                         note="ops.cache_weight_casts: +fp32 copy held (3x fp16 size)"),
    ]


def run(quick: bool = False) -> list[dict]:
    """All CPU rows for targets 1-3."""
    repeats = 3 if quick else 5
    rows = []
    rows += _target1("sd1_clip_config", (1, 4) if quick else (1, 4, 16), repeats)
    rows += _target1("sd2_clip_config", (1,) if quick else (1, 4, 16), repeats)
    if not quick:
        rows += _gap_breakdown("sd1_clip_config", 16, repeats + 3)
    for config in ("sd1_clip_config",) if quick else tuple(CONFIGS):
        rows += _target2(config, 4 if quick else 15)
    rows += _target3("sd1_clip_config", 4, repeats)
    if not quick:
        rows += _target3("sd2_clip_config", 1, repeats)
    return rows


#: Target 8: half precisions and batch sizes on the GPU.
GPU_DTYPES = (torch.float16, torch.bfloat16)
GPU_BATCHES = (1, 64)


def run_gpu(quick: bool = False, device: str = "cuda") -> list[dict]:
    """Target 8: the target-1 comparison on a GPU, per attention path (SDPA, and
    xformers when installed), fp16/bf16, batch 1 and 64; skipped without a GPU.

    ``device`` exists so the section can be exercised on CPU; the bench runs it on CUDA.
    """
    import copy

    from textenc.nn.attention import available_backends

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return [common.row("8 GPU forward", "CUDA", "-", "-", None, "<= 1.0x", None,
                           "skipped: no CUDA device here; run `python bench/run.py --gpu` on a GPU machine")]
    backends = [b for b in ("sdpa", "xformers") if b in available_backends(device)]
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed(fn):
        def call():
            fn()
            synchronize()
        return call
    rows = []
    if "xformers" not in backends:
        rows.append(common.row("8 GPU fwd vs HF", "xformers", "-", "-", None, "<= 1.0x", None,
                               "skipped: xformers is not installed (pip install 'textenc[xformers]')"))
    for config in CONFIGS:
        for dtype in GPU_DTYPES:
            # A converted copy per dtype: converting in place would hand the next
            # dtype (and the CPU sections) weights already rounded to this one.
            ref = copy.deepcopy(_hf_model(config)).to(device=device, dtype=dtype)
            ours = common.ours_text_model(config, _state_dict(config), dtype=dtype).to(device)
            for batch in GPU_BATCHES:
                ids = _ids(batch).to(device)
                fns = {"hf": timed(lambda: ref(ids))}
                diffs = {}
                with torch.inference_mode():
                    expected = ref(ids).last_hidden_state
                    for backend in backends:
                        out = ours(ids, dtype=dtype, attention_backend=backend).last_hidden_state
                        diffs[backend] = _max_diff(out, expected)
                        fns[backend] = timed(functools.partial(ours, ids, dtype=dtype,
                                                               attention_backend=backend))
                    stats = common.interleaved(fns, repeats=10 if quick else 30, warmup=3)
                for backend in backends:
                    rows.append(common.ratio_row(
                        "8 GPU fwd vs HF", f"{CONFIGS[config]} {str(dtype)[6:]} B{batch} {backend}",
                        stats[backend], stats["hf"], 1.0, ref_label="HF",
                        note=f"max|ours-hf|={diffs[backend]:.1e} (last hidden state, both in "
                             f"{str(dtype)[6:]}; magnitude ~{expected.abs().max().item():.0f})"))
            ref = ours = None  # free the device copies before the next dtype
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    for r in run(quick=True):
        print(r)
