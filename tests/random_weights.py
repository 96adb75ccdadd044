"""Test helper: give a model non-trivial random weights.

HF's own init leaves LayerNorms at 1/0 and biases at 0, which would hide a
swapped or dropped bias in a parity test; here everything is random, with
fan-in scaling so activations stay O(1) and attention is peaked enough for
masks to matter.
"""

from __future__ import annotations

import math

import torch


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2, generator=generator)
            elif "embedding" in name and p.dim() <= 2 and "patch" not in name:
                p.normal_(0.0, 1.0, generator=generator)
            elif p.dim() >= 2:
                p.normal_(0.0, math.prod(p.shape[1:]) ** -0.5, generator=generator)
            else:
                p.normal_(0.0, 0.1, generator=generator)
