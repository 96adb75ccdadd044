"""Test helper: tiny random SD3, Flux and Wan diffusers pipelines (configs after diffusers'
own tiny test configs), with text encoders in their real classes (transformers'
``CLIPTextModelWithProjection`` / ``CLIPTextModel``, ``T5EncoderModel``, ``UMT5EncoderModel``
via ``_from_config(config, attn_implementation="sdpa")``) and tokenizers: CLIP's bundled
vocabulary, T5 v1.1's bundled ``tokenizer.json``, a tiny SentencePiece model for UMT5.
"""

from __future__ import annotations

from pathlib import Path

import torch

from family_fixtures import spiece_bytes
from random_weights import randomize_
from textenc.prompts.tokenizer import DEFAULT_VOCAB
from textenc.text_encoders.t5 import T5_VOCAB

T5_WIDTH = 32
T5_SHAPE = dict(d_model=T5_WIDTH, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
                layer_norm_epsilon=1e-6, tie_word_embeddings=False)


def clip_encoder(width: int, *, seed: int, projection: int | None, act: str, pad: int):
    import transformers
    config = transformers.CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                                         num_attention_heads=2, hidden_act=act, projection_dim=projection or width,
                                         pad_token_id=pad, bos_token_id=49406, eos_token_id=49407)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls._from_config(config, attn_implementation="sdpa")
    randomize_(model, seed)
    return model.eval()


def t5_encoder(kind: str, *, seed: int, vocab: int):
    import transformers
    config_class, model_class = ((transformers.UMT5Config, transformers.UMT5EncoderModel) if kind == "umt5"
                                 else (transformers.T5Config, transformers.T5EncoderModel))
    model = model_class._from_config(config_class(vocab_size=vocab, **T5_SHAPE), attn_implementation="sdpa")
    randomize_(model, seed)
    with torch.no_grad():
        model.shared.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def clip_tokenizer(pad: str | None = None):
    import transformers
    kwargs = {"pad_token": pad} if pad else {}
    return transformers.CLIPTokenizer.from_pretrained(DEFAULT_VOCAB, model_max_length=77, **kwargs)


def t5_tokenizer():
    import transformers
    return transformers.T5TokenizerFast(tokenizer_file=str(Path(T5_VOCAB) / "tokenizer.json"), model_max_length=512)


def umt5_tokenizer(folder: Path):
    """transformers' ``T5Tokenizer`` on the tiny SentencePiece model, its ids from ``sentencepiece``
    itself: transformers 5 converts a SentencePiece model to its own tokenizer, which maps this
    tiny byte-fallback model's pieces to ``<unk>``; google/umt5-xxl's ids are SentencePiece's,
    ``</s>`` appended, ``<pad>`` (0) after, as this gives them."""
    import sentencepiece
    import transformers

    path = folder / "spiece.model"
    path.write_bytes(spiece_bytes())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))

    class SentencePieceT5Tokenizer(transformers.T5Tokenizer):
        def __call__(self, text, *, padding="max_length", max_length=512, truncation=True,
                     add_special_tokens=True, return_attention_mask=True, return_tensors="pt", **_):
            texts = [text] if isinstance(text, str) else list(text)
            rows = [(processor.encode(t) + [1])[:max_length] for t in texts]
            width = max_length if padding == "max_length" else max(len(r) for r in rows)
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            return transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})

    return SentencePieceT5Tokenizer(vocab_file=str(path), extra_ids=0, model_max_length=512)


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler()


def _image_vae():
    from diffusers import AutoencoderKL
    torch.manual_seed(5)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035)


def sd3_pipeline(*, identity_l_projection: bool = True):
    """SD3: L (width 16, projected 16) and G (width 16, projected 16), T5 of width 32."""
    import diffusers
    torch.manual_seed(6)
    transformer = diffusers.SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1,
                                                  attention_head_dim=8, num_attention_heads=4,
                                                  caption_projection_dim=32, joint_attention_dim=T5_WIDTH,
                                                  pooled_projection_dim=32, out_channels=4)
    clip_l = clip_encoder(16, seed=1, projection=16, act="quick_gelu", pad=49407)
    if identity_l_projection:  # ComfyUI's SD3 pooled takes L unprojected: equal when L's projection is I
        with torch.no_grad():
            clip_l.text_projection.weight.copy_(torch.eye(16))
    return diffusers.StableDiffusion3Pipeline(
        scheduler=_flow_scheduler(), vae=_image_vae(), transformer=transformer,
        text_encoder=clip_l, tokenizer=clip_tokenizer(),
        text_encoder_2=clip_encoder(16, seed=2, projection=16, act="gelu", pad=0), tokenizer_2=clip_tokenizer("!"),
        text_encoder_3=t5_encoder("t5", seed=3, vocab=32128), tokenizer_3=t5_tokenizer())


def flux_pipeline():
    """Flux: CLIP-L (width 16, unprojected pooled) and T5 of width 32."""
    import diffusers
    torch.manual_seed(7)
    transformer = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                                   attention_head_dim=16, num_attention_heads=2,
                                                   joint_attention_dim=T5_WIDTH, pooled_projection_dim=16,
                                                   axes_dims_rope=[4, 4, 8])
    return diffusers.FluxPipeline(
        scheduler=_flow_scheduler(), vae=_image_vae(), transformer=transformer,
        text_encoder=clip_encoder(16, seed=1, projection=None, act="quick_gelu", pad=49407),
        tokenizer=clip_tokenizer(), text_encoder_2=t5_encoder("t5", seed=3, vocab=32128), tokenizer_2=t5_tokenizer())


def wan_pipeline(folder: Path):
    """Wan: UMT5 of width 32 with a tiny SentencePiece tokenizer."""
    import diffusers
    torch.manual_seed(8)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    transformer = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                                  in_channels=16, out_channels=16, text_dim=T5_WIDTH, freq_dim=256,
                                                  ffn_dim=32, num_layers=2, cross_attn_norm=True,
                                                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return diffusers.WanPipeline(tokenizer=umt5_tokenizer(folder), text_encoder=t5_encoder("umt5", seed=4, vocab=512),
                                 transformer=transformer, vae=vae, scheduler=_flow_scheduler())
