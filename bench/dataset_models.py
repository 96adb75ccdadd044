"""Random CLIP text encoders in textenc's checkpoint layouts, for the dataset benchmarks
(``bench_dataset.py``, ``dataset_drift.py``): one builder, so both measure the same models.

Weights are transformers' own random initialisation (no download), seeded by the
encoder's position in its checkpoint: an SDXL pair is CLIP-L from seed 0 and G from
seed 1, so ``sdxl``'s L equals ``sd1``'s when the sizes match.
"""

from __future__ import annotations

from typing import Sequence

import torch

WORDS = ("a photo of the cat dog red blue house tree sky sun moon painting portrait old woman man "
         "city night river mountain forest girl boy smiling standing").split()

#: transformers ``CLIPTextConfig`` sizes: small ones (4 layers) for speed ratios, and the
#: real CLIP-L and ViT-bigG sizes for drift and full-size timings.
SIZES = {"l": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                   projection_dim=256, hidden_act="quick_gelu"),
         "h": dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=4, num_attention_heads=5,
                   projection_dim=320, hidden_act="gelu"),
         "g": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6,
                   projection_dim=384, hidden_act="gelu"),
         "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        projection_dim=768, hidden_act="quick_gelu"),
         "bigg": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu")}

#: A checkpoint is a list of (size, textenc layout, keeps text_projection): SD1's and
#: SDXL's CLIP-L have no projection, SD2's ViT-H and SDXL's G do.
Part = tuple[str, str, bool]


def hf_model(size: str, seed: int):
    """A random ``CLIPTextModelWithProjection`` of ``SIZES[size]``, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                         bos_token_id=49406, **SIZES[size])
    return transformers.CLIPTextModelWithProjection._from_config(config, attn_implementation="sdpa").eval()


def checkpoint_state(parts: Sequence[Part]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """``(state dict in textenc's layouts, {size: the transformers model})``; part ``i`` is
    seeded ``i``."""
    from textenc.loading.convert import to_layout

    state, models = {}, {}
    for seed, (size, layout, projection) in enumerate(parts):
        models[size] = hf_model(size, seed)
        weights = {k: v.detach().contiguous().clone() for k, v in models[size].state_dict().items()
                   if projection or k != "text_projection.weight"}
        state.update(to_layout(weights, layout))
    return state, models
