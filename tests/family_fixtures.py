"""Test helper: tiny random CLIP-L, CLIP-G, T5 and UMT5 encoders in their real key layouts
(transformers' ``CLIPTextModelWithProjection``, ``T5EncoderModel``, ``UMT5EncoderModel``, built
with ``_from_config(config, attn_implementation="sdpa")`` and randomised), written as the files
users download (``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors``,
``umt5_xxl.safetensors`` with its ``spiece_model``) and as one single-file SD3-style checkpoint
(``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``). The transformers models are the oracles.

Widths: L 64, G 128, T5 192 (= L + G, so SD3's CLIP features fill T5's width exactly); the T5
vocabulary is the real one (32128) so the bundled tokenizer's ids fit.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from safetensors.torch import save_file

from random_weights import randomize_

L_WIDTH, G_WIDTH, T5_WIDTH = 64, 128, 192
T5_VOCAB_SIZE, UMT5_VOCAB_SIZE = 32128, 512
T5_SHAPE = dict(d_model=T5_WIDTH, d_kv=16, d_ff=96, num_layers=3, num_heads=4,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                tie_word_embeddings=False)
TRAINING_TEXT = [
    "a photo of a cat sitting on a mat", "the quick brown fox jumps over the lazy dog",
    "a painting of a mountain at sunset, highly detailed", "portrait of a woman with red hair",
    "日本語のテキスト", "numbers 123 456", "</s> typed as text",
] * 20


def clip_model(kind: str, seed: int, width: int | None = None):
    """CLIP-L (``"l"``: quick_gelu, pad 49407, 1 head) or CLIP-G (``"g"``: gelu, pad 0, 2 heads), random;
    ``width`` (a multiple of 64) overrides the tiny one."""
    import transformers
    width = width or (L_WIDTH if kind == "l" else G_WIDTH)
    config = transformers.CLIPTextConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3, num_attention_heads=width // 64,
        vocab_size=49408, max_position_embeddings=77, projection_dim=width,
        hidden_act="quick_gelu" if kind == "l" else "gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407 if kind == "l" else 0, layer_norm_eps=1e-5)
    model = transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa")
    randomize_(model, seed)
    return model.eval()


def t5_model(kind: str, seed: int, **shape):
    """T5 v1.1 (``"t5"``) or UMT5 (``"umt5"``) encoder of the tiny shape (``shape`` overrides), random."""
    import transformers
    if kind == "umt5":
        model = transformers.UMT5EncoderModel._from_config(
            transformers.UMT5Config(vocab_size=UMT5_VOCAB_SIZE, **{**T5_SHAPE, **shape}), attn_implementation="sdpa")
    else:
        model = transformers.T5EncoderModel._from_config(
            transformers.T5Config(vocab_size=T5_VOCAB_SIZE, **{**T5_SHAPE, **shape}), attn_implementation="sdpa")
    randomize_(model, seed)
    with torch.no_grad():  # randomize_ leaves the shared embedding fan-in small; make it O(1)
        model.shared.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def weights(model) -> dict[str, torch.Tensor]:
    """The model's state dict as released files hold it (T5: no tied ``encoder.embed_tokens`` copy)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if k != "encoder.embed_tokens.weight"}


def spiece_bytes() -> bytes:
    """A tiny Unigram SentencePiece model with UMT5's special ids (pad 0, </s> 1, unk 2, no <s>)."""
    import sentencepiece
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT), model_writer=model, vocab_size=400, model_type="unigram",
        hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
        character_coverage=1.0, minloglevel=2)
    return model.getvalue()


class TinyFamily:
    """The four tiny models, their files under ``folder``, and the oracles."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.clip_l, self.clip_g = clip_model("l", 1), clip_model("g", 2)
        self.t5, self.umt5 = t5_model("t5", 3), t5_model("umt5", 4)
        self.spiece = spiece_bytes()
        spiece = torch.tensor(list(self.spiece), dtype=torch.uint8)
        self.paths = {
            "l": self._save("clip_l.safetensors", weights(self.clip_l)),
            "g": self._save("clip_g.safetensors", weights(self.clip_g)),
            # ComfyUI's own saved layout names the role (a non-standard width alone cannot)
            "g_named": self._save("clip_g_named.safetensors",
                                  {f"clip_g.transformer.{k}": v for k, v in weights(self.clip_g).items()}),
            "t5": self._save("t5xxl_fp32.safetensors", weights(self.t5)),
            "umt5": self._save("umt5_xxl.safetensors", {**weights(self.umt5), "spiece_model": spiece}),
            "umt5_bare": self._save("umt5_xxl_no_tokenizer.safetensors", weights(self.umt5)),
        }
        single = {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(4, 4)}
        for prefix, model in (("clip_l", self.clip_l), ("clip_g", self.clip_g), ("t5xxl", self.t5)):
            single.update({f"text_encoders.{prefix}.transformer.{k}": v for k, v in weights(model).items()})
        self.paths["sd3"] = self._save("sd3.5_tiny.safetensors", single)

    def _save(self, name: str, sd: dict[str, torch.Tensor]) -> Path:
        path = self.folder / name
        save_file(sd, str(path))
        return path
