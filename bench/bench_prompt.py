"""Prompt-encoding and tokenization benchmark: textenc vs a ComfyUI-style reference.

Model cases use the full-size CLIP ViT-L/14 text model (``sd1_clip_config``,
~123M parameters, random weights, fp32, CPU); the reference
(``tests/comfy_reference.py``, also the tests' oracle) runs on the same
``SDClipModel`` forward, so only the prompt machinery differs. Outputs are checked equal to 1e-5 and tokenizer
outputs identical before timing. Runs are interleaved A B A B ...

Targets (issue #6, target 4): a one-window weighted prompt ≤ 1.1× an
unweighted one (ours) and ≤ 0.65× the reference; a three-window prompt encodes
all its windows in one batched forward (counted with a forward hook; its time
against the reference is shown too, bounded below by 3/4: the reference runs
the empty prompt as a fourth row). Tokenization ≥ 3.5× reference throughput (issue 27,
point 7; it was 3× before; ``bench_vs_comfyui.py`` adds real ComfyUI's tokenizer).
Issue #17 adds an A1111 row: a three-chunk tag prompt read with
``syntax="a1111"`` (chunking, comma backtracking, "Original" emphasis), text to
conditioning, side by side with the same prompt on the ComfyUI path (info).

Issue 15 (point 5): a 1 MB prompt (short words; and weighted groups) is refused by ``max_windows``
(default 256) in under 1 s with under 64 MiB of peak memory growth (the
process's resident high-water mark, reset through ``/proc/self/clear_refs``
on Linux, so the Rust tokenizer's memory counts too); the reference column is
the same prompt tokenized in full with ``max_windows=None``.

Usage: ``python bench/bench_prompt.py [--quick]``
"""

from __future__ import annotations

import functools
import os
import random
import statistics
import sys
import time
from typing import Callable

import torch

# bench/ first, then tests/ for the ComfyUI reference the tests check textenc against.
_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_BENCH, os.path.join(os.path.dirname(_BENCH), "tests")]
import common  # noqa: E402
from comfy_reference import ComfyTokenizer, comfy_encode_token_weights  # noqa: E402

from textenc.errors import PromptError  # noqa: E402
from textenc.text_encoders.sd1_clip import SDClipModel  # noqa: E402
from textenc.prompts.tokenizer import DEFAULT_VOCAB, SDTokenizer  # noqa: E402

ONE_WINDOW = "a photo of a red fox sitting in deep snow, golden hour, highly detailed, 35mm"
WEIGHTED = "a photo of a (red fox:1.3) sitting in (deep snow:0.8), ((golden hour)), highly detailed, 35mm"
TAGS = ("masterpiece", "best quality", "1girl", "solo", "long hair", "looking at viewer", "smile",
        "blue eyes", "outdoors", "cherry blossoms", "school uniform", "night sky", "city lights",
        "cinematic lighting", "depth of field", "bokeh", "volumetric fog", "hyperrealistic",
        "octane render", "trending on artstation", "by greg rutkowski", "watercolor", "oil painting",
        "portrait", "landscape", "mountains", "river", "forest", "castle", "dragon", "cyberpunk",
        "steampunk", "art nouveau", "4k", "8k uhd", "dslr", "film grain", "fujifilm xt3")
COMPEL_DOWN = "a photo of a (red fox)1.3 sitting in (deep snow)0.8, (golden hour)0.6, highly detailed, 35mm"
UNICODE = ("café", "naïve", "東京タワー", "🦊", "Ωmega", "straße", "crème brûlée", "日本の風景", "ñandú")


def make_model() -> SDClipModel:
    """Full-size CLIP-L text encoder with random weights (seeded)."""
    model = SDClipModel(return_projected_pooled=False)
    generator = torch.Generator().manual_seed(0)
    sd = {}
    for key, meta in model.transformer.state_dict().items():
        if "norm" in key and key.endswith("weight"):
            sd[key] = torch.ones(meta.shape)
        elif "embedding" in key or meta.dim() >= 2:
            sd[key] = torch.randn(meta.shape, generator=generator) * 0.02
        else:
            sd[key] = torch.zeros(meta.shape)
    model.load_sd(sd)
    return model


def make_corpus(count: int, seed: int = 0) -> list[str]:
    """Realistic prompts: tag lists, weights, long (150+ token) prompts, unicode, escapes."""
    rng = random.Random(seed)

    def tag() -> str:
        t = rng.choice(TAGS + UNICODE) if rng.random() < 0.15 else rng.choice(TAGS)
        roll = rng.random()
        if roll < 0.15:
            return f"({t}:{rng.choice(['0.5', '0.8', '1.1', '1.2', '1.35', '1.5'])})"
        if roll < 0.22:
            return f"(({t}))"
        if roll < 0.27:
            return f"[{t}]"
        if roll < 0.31:
            return f"\\({t}\\)"
        return t

    prompts = []
    for i in range(count):
        kind = i % 4
        if kind == 3:  # long: 150+ tokens
            prompts.append(", ".join(tag() for _ in range(rng.randint(70, 110))))
        elif kind == 2:
            prompts.append(f"a photo of {rng.choice(TAGS)}, " + ", ".join(tag() for _ in range(8)))
        else:
            prompts.append(", ".join(tag() for _ in range(rng.randint(5, 25))))
    return prompts


def stats(times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    return f"{min(ms):.1f} / {statistics.median(ms):.1f} / {max(ms):.1f}"


def _row(case: str, ours: list, ref: list, ratio: float, target: str, ok: bool | None) -> dict:
    return {"case": case, "ours_ms": stats(ours), "reference_ms": stats(ref), "ratio": round(ratio, 3),
            "target": target, "ok": ok}


def _check_equal(model: SDClipModel, windows) -> None:
    ours_cond, ours_pooled = model.encode_token_weights(windows)
    ref_cond, ref_pooled = comfy_encode_token_weights(model, windows)
    difference = max((ours_cond - ref_cond).abs().max().item(), (ours_pooled - ref_pooled).abs().max().item())
    if difference > 1e-5:
        raise AssertionError(f"textenc and the reference differ by {difference:.3g}")


def _forward_batches(model: SDClipModel, encode: Callable[[], object]) -> list[int]:
    """The batch size of every transformer forward that ``encode()`` runs."""
    batches: list[int] = []

    def record(module, args, kwargs, output):
        tokens = args[0] if args and args[0] is not None else kwargs.get("embeds")
        batches.append(tokens.shape[0])

    hook = model.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        encode()
    finally:
        hook.remove()
    return batches


def _forward_count_row(model: SDClipModel, windows) -> dict:
    ours = _forward_batches(model, lambda: model.encode_token_weights(windows))
    ref = _forward_batches(model, lambda: comfy_encode_token_weights(model, windows))
    return {"case": f"weighted, {len(windows)} windows: transformer forwards per encode",
            "ours_ms": "", "reference_ms": "", "ratio": None, "target": "1 batched forward",
            "ok": ours == [len(windows)],
            "note": f"ours: batch sizes {ours}; reference: {ref} (the empty prompt rides along)"}


def bench_encoding(rounds: int) -> list[dict]:
    model = make_model()
    tokenizer = SDTokenizer()
    cases = {
        "unweighted, 1 window": tokenizer.tokenize_with_weights(ONE_WINDOW),
        "weighted, 1 window": tokenizer.tokenize_with_weights(WEIGHTED),
        "weighted, 3 windows": tokenizer.tokenize_with_weights(", ".join([WEIGHTED] * 8)),
    }
    assert len(cases["weighted, 3 windows"]) == 3
    fns = {}
    for name, windows in cases.items():
        _check_equal(model, windows)  # also warms the empty-prompt cache
        fns[f"{name}|ours"] = functools.partial(model.encode_token_weights, windows)
        fns[f"{name}|ref"] = functools.partial(comfy_encode_token_weights, model, windows)
    # Every case, ours and the reference, in the same alternating rounds: the
    # weighted/unweighted ratio below compares times from the same rounds too.
    times = {k: v.samples for k, v in common.interleaved(fns, repeats=rounds).items()}
    rows = []
    for name in cases:
        ours, ref = times[f"{name}|ours"], times[f"{name}|ref"]
        ratio = statistics.median(ours) / statistics.median(ref)
        if name == "weighted, 3 windows":
            rows.append(_row(name, ours, ref, ratio, "info (bound: ≥ 0.75)", None))
        elif name.startswith("weighted"):
            rows.append(_row(name, ours, ref, ratio, "≤ 0.65× reference", ratio <= 0.65))
        else:
            rows.append(_row(name, ours, ref, ratio, "info", None))
    rows.append(_forward_count_row(model, cases["weighted, 3 windows"]))
    overhead = (statistics.median(times["weighted, 1 window|ours"])
                / statistics.median(times["unweighted, 1 window|ours"]))
    rows.append({"case": "weighted / unweighted (ours, 1 window)", "ours_ms": "", "reference_ms": "",
                 "ratio": round(overhead, 3), "target": "≤ 1.1×", "ok": overhead <= 1.1})
    return rows


A1111_PROMPT = ", ".join(f"({tag}:1.2)" if i % 5 == 0 else tag for i, tag in enumerate(TAGS + TAGS[:6])) + " BREAK 4k"


def bench_a1111(rounds: int) -> list[dict]:
    """Text to conditioning: ``syntax="a1111"`` (3 chunks) vs the ComfyUI path, same prompt."""
    model, tokenizer = make_model(), SDTokenizer()

    def a1111():
        windows = tokenizer.tokenize_with_weights(A1111_PROMPT, syntax="a1111")
        return model.encode_token_weights(windows, options={"weight_mode": "a1111"})

    def comfy():
        return model.encode_token_weights(tokenizer.tokenize_with_weights(A1111_PROMPT))

    chunks = len(tokenizer.tokenize_with_weights(A1111_PROMPT, syntax="a1111"))
    if chunks != 3:
        raise AssertionError(f"the A1111 case has {chunks} chunks, not 3")
    timed = common.interleaved({"a1111": a1111, "comfy": comfy}, repeats=rounds)
    ours, ref = timed["a1111"].samples, timed["comfy"].samples
    ratio = statistics.median(ours) / statistics.median(ref)
    windows = len(tokenizer.tokenize_with_weights(A1111_PROMPT))
    row = _row(f"A1111 prompt, 3 chunks (comfy path: {windows} windows), text to cond", ours, ref, ratio,
               "info", None)
    row["reference_ms"] = f"{row['reference_ms']} (comfy)"
    return [row]


def bench_tokenization(rounds: int, count: int) -> list[dict]:
    import transformers

    corpus = make_corpus(count)
    hf = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    ours_once, ref_once = SDTokenizer(), ComfyTokenizer(hf)
    for prompt in corpus:  # identical output, word ids included
        if ours_once.tokenize_with_weights(prompt, True) != ref_once.tokenize_with_weights(prompt, True):
            raise AssertionError(f"tokenizers differ on {prompt!r}")
    # Fresh instances per round: a warm unit cache from the previous round would not be a fair test.
    fresh = {"ours": [SDTokenizer() for _ in range(rounds)],
             "ref": [ComfyTokenizer(transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB))
                     for _ in range(rounds)]}

    def run_all(kind: str):
        tokenizer = fresh[kind].pop()
        for prompt in corpus:
            tokenizer.tokenize_with_weights(prompt)

    # No warm-up round: each round takes a fresh (cold-cache) tokenizer.
    timed = common.interleaved({"ours": lambda: run_all("ours"), "ref": lambda: run_all("ref")},
                               repeats=rounds, warmup=0)
    ours, ref = timed["ours"].samples, timed["ref"].samples
    speedup = statistics.median(ref) / statistics.median(ours)
    row = _row(f"tokenize {count} prompts", ours, ref, speedup, "≥ 3.5× reference", speedup >= 3.5)
    row["prompts_per_s"] = round(count / statistics.median(ours))
    return [row]


def make_megabyte_prompt(seed: int = 0) -> str:
    """One million characters of short words (about 500,000 tokens)."""
    rng = random.Random(seed)
    words = ("a", "cat", "dog", "red", "sky", "on", "in", "fox", "of", "is")
    return " ".join(rng.choice(words) for _ in range(400_000))[:1_000_000]


def _memory_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _refuse_once(tokenizer: SDTokenizer, prompt: str) -> tuple[float, float | None]:
    """Seconds and MiB of peak RSS growth for one refusal."""
    from textenc.errors import PromptError

    measurable = _reset_peak()
    before = _memory_kib("VmRSS")
    start = time.perf_counter()
    try:
        tokenizer.tokenize_with_weights(prompt)
    except PromptError:
        elapsed = time.perf_counter() - start
    else:
        raise AssertionError("the 1 MB prompt was not refused by max_windows")
    peak = _memory_kib("VmHWM")
    growth = (peak - before) / 1024 if measurable and peak is not None and before is not None else None
    return elapsed, growth


def bench_max_windows(rounds: int) -> list[dict]:
    """Refusing 1 MB prompts: short words, and 71,000 weighted groups (the parser's worst case)."""
    tokenizer = SDTokenizer()
    tokenizer.tokenize_with_weights(ONE_WINDOW)
    rows = []
    for label, prompt in (("1 MB prompt", make_megabyte_prompt()),
                          ("1 MB weighted prompt", ("(red fox:1.2) " * 80_000)[:1_000_000])):
        refusals = [_refuse_once(SDTokenizer(), prompt) for _ in range(rounds)]  # cold caches
        start = time.perf_counter()
        windows = tokenizer.tokenize_with_weights(prompt, max_windows=None)
        full = time.perf_counter() - start
        times = [t for t, _ in refusals]
        growths = [g for _, g in refusals if g is not None]
        peak = max(growths) if growths else None
        ok = max(times) < 1.0 and (peak is None or peak < 64)
        row = _row(f"refuse a {label} (max_windows=256)", times, [full], max(times) / full,
                   "< 1 s and < 64 MiB peak growth", ok)
        row["note"] = (f"peak RSS growth {peak:.1f} MiB" if peak is not None else "peak RSS not measurable here") + \
            f"; tokenizing it in full gives {len(windows)} windows"
        rows.append(row)
    return rows


def bench_pathological(rounds: int) -> list[dict]:
    """Hostile prompts that unit tests only check for results: 100,000-deep nesting
    (parsed or refused in < 0.5 s each) and 1 MB single groups (tokenized in < 5 s)."""
    depth = 100_000
    cases = [("100k-deep (a:1)", "(" * depth + "a:1" + ")" * depth, 0.5),
             ("100k-deep ((a)) refused", "(" * depth + "a" + ")" * depth, 0.5),
             ("1 MB of '('", "(" * 1_048_576, 5.0), ("1 MB of one emoji", "\U0001F642" * 1_048_576, 5.0)]
    rows = []
    for label, prompt, limit in cases:
        times = []
        for _ in range(rounds):
            tokenizer = SDTokenizer()  # cold caches
            start = time.perf_counter()
            try:
                tokenizer.tokenize_with_weights(prompt, max_windows=None)
            except PromptError:
                pass
            times.append(time.perf_counter() - start)
        rows.append(_row(f"hostile prompt: {label}", times, [limit], max(times) / limit,
                         f"< {limit} s", max(times) < limit))
    return rows


def _hf_twin(model: SDClipModel):
    """A transformers ``CLIPTextModel`` holding ``model``'s weights (the real compel's encoder)."""
    import transformers

    c = model.config
    config = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=77, hidden_act=c.hidden_act, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407)
    hf = transformers.CLIPTextModel._from_config(config, attn_implementation="sdpa").eval()
    ours = {k.removeprefix("text_model."): v for k, v in model.transformer.state_dict().items()}
    wanted = hf.state_dict()
    missing = [k for k in wanted if k.removeprefix("text_model.") not in ours]
    if missing:
        raise AssertionError(f"cannot copy weights into transformers' CLIPTextModel: {missing[:4]}")
    hf.load_state_dict({k: ours[k.removeprefix("text_model.")] for k in wanted})
    return hf


def bench_compel(rounds: int) -> list[dict]:
    """A compel down-weighted prompt: textenc's ``syntax="compel"`` vs the real compel."""
    try:
        from compel import Compel
        import transformers
    except ImportError:
        return [{"case": "compel down-weighted prompt", "ours_ms": "", "reference_ms": "", "ratio": None,
                 "target": "info", "ok": None, "note": "compel not installed"}]
    model = make_model()
    hf = _hf_twin(model)
    # requires_pooled: both sides return (cond, pooled), the pooled output of the raw text.
    compel = Compel(tokenizer=transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77),
                    text_encoder=hf, requires_pooled=True)
    tokenizer = SDTokenizer()

    def ours():
        tokens = tokenizer.tokenize_with_weights(COMPEL_DOWN, syntax="compel")
        return model.encode_token_weights(tokens, options={"weight_mode": "compel"})[:2]

    def theirs():
        with torch.no_grad():
            return compel(COMPEL_DOWN)

    difference = max((a - b).abs().max().item() for a, b in zip(ours(), theirs()))
    if difference > 1e-4:
        raise AssertionError(f"textenc and compel differ by {difference:.3g} on {COMPEL_DOWN!r}")
    timed = common.interleaved({"ours": ours, "ref": theirs}, repeats=rounds)
    times_ours, times_ref = timed["ours"].samples, timed["ref"].samples
    ratio = statistics.median(times_ours) / statistics.median(times_ref)
    row = _row("compel down-weighted prompt, cond + pooled (reference: compel 2.5 on transformers)",
               times_ours, times_ref,
               ratio, "info", None)
    started = time.perf_counter()
    compel.parse_prompt_string(COMPEL_DOWN)
    parse_ms = (time.perf_counter() - started) * 1000
    row["note"] = (f"max difference {difference:.2g}; compel builds its pyparsing grammar on every call "
                   f"(one build + parse: {parse_ms:.0f} ms)")
    return [row]


def run(quick: bool = False) -> list[dict]:
    """Run every case; ``quick`` uses fewer rounds (< 40 s) for CI."""
    rounds = 3 if quick else 7
    return (bench_encoding(rounds) + bench_a1111(rounds) + bench_compel(rounds)
            + bench_tokenization(2 if quick else 5, 2000) + bench_max_windows(2 if quick else 5)
            + bench_pathological(2 if quick else 3))


def main() -> None:
    started = time.perf_counter()
    rows = run(quick="--quick" in sys.argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; times min / median / max ms\n")
    print("| case | ours | reference | ratio | target | ok | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['ours_ms']} | {r['reference_ms']} | {r['ratio']} | {r['target']} | "
              f"{ {True: 'yes', False: 'NO', None: 'info'}[r['ok']] } | {r.get('note', '')} |")
    print(f"\n(ratio: ours/reference time for encoding, reference/ours for tokenization; "
          f"total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
