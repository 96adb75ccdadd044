"""Text-encoder families (SD1, SD2, SDXL, SD3, Flux, Wan): their wrappers, clip-skip numbering,
per-call options, weighting and the batched encode.

Each family is one module (:mod:`.sd1_clip`, :mod:`.sd2_clip`, :mod:`.sdxl_clip`,
:mod:`.sd3_clip`, :mod:`.flux`, :mod:`.wan`) that registers one
:class:`~textenc.text_encoders.registry.Family` entry; ask the registry through
:mod:`textenc.text_encoders.families`, which imports them all. :mod:`.t5` holds the T5 /
UMT5 encoders the last three use; :mod:`.selection` picks the family found encoders make.
"""
