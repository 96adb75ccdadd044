"""Encode a caption dataset into sharded safetensors files (``textenc encode-dataset``).

>>> # report = encode_dataset("captions.txt", model="sd15.safetensors", out="te_cache")
>>> # for caption_id, cond, pooled in open_shards("te_cache"): ...

Modules, lowest first: :mod:`~textenc.dataset.inputs` (reading captions),
:mod:`~textenc.dataset.lock` (one run per output folder),
:mod:`~textenc.dataset.format` (shards, manifest, reader), :mod:`~textenc.dataset.export`
(diffusers and kohya files), :mod:`~textenc.dataset.layout` (how a caption is stored),
:mod:`~textenc.dataset.encode` (batched caption encoding),
:mod:`~textenc.dataset.pipeline` (tokenize → encode → write),
:mod:`~textenc.dataset.model`, :mod:`~textenc.dataset.manifest`,
:mod:`~textenc.dataset.engines` (``local``, ``ray`` and its ``reaper``),
:mod:`~textenc.dataset.driver` (:func:`encode_dataset`) and
:mod:`~textenc.dataset.cli`. Run standalone as
``python -m textenc.dataset INPUT --model M --out DIR``.
"""

from .cli import add_encode_dataset_arguments, main, run_encode_dataset
from .driver import encode_dataset
from .export import export_diffusers, export_kohya
from .format import open_captions, open_shards
from .model import model_fingerprint
from .report import DatasetReport

__all__ = ["DatasetReport", "encode_dataset", "open_shards", "open_captions", "export_diffusers", "export_kohya",
           "add_encode_dataset_arguments", "run_encode_dataset", "model_fingerprint", "main"]
