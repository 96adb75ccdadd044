"""Text-encoder families (SD1, SD2, SDXL, ...): their wrappers, clip-skip numbering,
per-call options, weighting and the batched encode."""
