"""Benchmark ``encode-dataset`` on Flux captions against a plain transformers loop.

``python bench/bench_dataset_flux.py [--captions N] [--t5-layers L]`` prints one markdown row.
Models are random, mid-size, in the real key layouts: CLIP-L (transformers'
``CLIPTextModel``, 4 layers, width 256) and T5 v1.1 (``T5EncoderModel``, width 512,
``--t5-layers`` layers, 8 heads, the real 32128-token vocabulary), saved as the files
ComfyUI users download (``clip_l.safetensors``, ``t5xxl_fp16.safetensors``-style keys).

Both sides run fp32 at this process's torch thread count, in alternating rounds (medians):

* textenc: ``encode_dataset(..., clip_type="flux")`` (local engine; T5 at ComfyUI's
  minimum of 256 tokens, stored fp16 at each caption's own length);
* plain: transformers' tokenizers and models, batch 64: CLIP-L ``pooler_output``,
  T5 padded to 256, unmasked (FluxPipeline's encode at ``max_sequence_length=256``),
  outputs cast to fp16.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("a photo of the cat dog red blue house tree sky sun moon old woman man city night "
         "painting portrait detailed light shadow river mountain snow forest street").split()


def _models(t5_layers: int):
    import transformers
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel._from_config(transformers.CLIPTextConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        hidden_act="quick_gelu", pad_token_id=49407), attn_implementation="sdpa").eval()
    t5 = transformers.T5EncoderModel._from_config(transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=t5_layers, num_heads=8,
        feed_forward_proj="gated-gelu", dropout_rate=0.0), attn_implementation="sdpa").eval()
    return clip, t5


def _files(folder: Path, clip, t5) -> list[str]:
    from safetensors.torch import save_file
    paths = [folder / "clip_l.safetensors", folder / "t5xxl_bench.safetensors"]
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(paths[0]))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(paths[1]))
    return [str(p) for p in paths]


def _captions(folder: Path, count: int) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" {i}" for i in range(count)]
    path = folder / "captions.txt"
    path.write_text("\n".join(texts) + "\n")
    return path, texts


def _plain(clip, t5, texts: list[str]) -> None:
    import transformers
    from textenc.prompts.tokenizer import DEFAULT_VOCAB
    from textenc.text_encoders.t5 import T5_VOCAB
    clip_tok = transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB)
    t5_tok = transformers.T5TokenizerFast(tokenizer_file=str(Path(T5_VOCAB) / "tokenizer.json"))
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = texts[start:start + 64]
            ids = clip_tok(batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            clip(input_ids=ids).pooler_output.half()
            ids = t5_tok(batch, padding="max_length", max_length=256, truncation=True, return_tensors="pt").input_ids
            t5(ids)[0].half()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--captions", type=int, default=256)
    parser.add_argument("--t5-layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from textenc.dataset import encode_dataset
    clip, t5 = _models(args.t5_layers)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = _files(folder, clip, t5)
        captions, texts = _captions(folder, args.captions)
        ours, plain = [], []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            encode_dataset(str(captions), model=model, out=str(folder / f"out{round_}"), clip_type="flux",
                           progress=False, threads=torch.get_num_threads())
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            _plain(clip, t5, texts)
            plain.append(time.perf_counter() - start)
    rate, plain_rate = args.captions / statistics.median(ours), args.captions / statistics.median(plain)
    print(f"| dataset | Flux captions, local engine vs plain transformers loop (fp32, T5 256 tokens, "
          f"{args.t5_layers}-layer 512-wide T5, 4-layer 256-wide CLIP-L) | {rate:.1f} captions/s | "
          f"plain {plain_rate:.1f} captions/s | {rate / plain_rate:.2f}x | {args.captions} captions, "
          f"{torch.get_num_threads()} thread(s), medians of {args.rounds} rounds |")


if __name__ == "__main__":
    main()
