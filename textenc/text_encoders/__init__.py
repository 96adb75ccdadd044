"""Text-encoder families (SD1, SD2, SDXL, ...): their wrappers, clip-skip numbering,
per-call options, weighting and the batched encode.

Each family is one module (:mod:`.sd1_clip`, :mod:`.sd2_clip`, :mod:`.sdxl_clip`) that
registers one :class:`~textenc.text_encoders.registry.Family` entry; ask the registry
through :mod:`textenc.text_encoders.families`, which imports them all.
"""
