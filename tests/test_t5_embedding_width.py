"""A textual inversion whose width does not match T5, in a T5 prompt (issue 26, left point 4).

ComfyUI (618b803) does not crash on it:

* ``comfy/sd1_clip.py`` ``load_embed`` has no width check (only its list-of-dicts branch filters
  by ``embedding_size``): the T5 tokenizer (``embedding_key="t5xxl"``) takes the file's
  ``t5xxl`` entry, else its first tensor, and ``tokenize_with_weights`` puts each row in the
  token list, where it counts towards the sequence length and the minimum-length padding;
* ``SDClipModel.process_tokens`` drops a vector whose width is not the model's ("shape mismatch
  ... embedding will be ignored") and appends as many pad tokens (mask 0) at the end of the
  sequence (``pad_extra``), so the length stays.

textenc's T5 tokenizers keep such vectors in the tokens (``embedding_any_width``) and its encode
drops them the same way, so a prompt longer than the minimum gets ComfyUI's length and rows. The
reference below restates that rule over transformers' T5.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import family_reference as ref
from family_fixtures import TinyFamily
from textenc.errors import EmbeddingWarning
from textenc.sd import load_clip

transformers = pytest.importorskip("transformers")
ROWS = 3  # the embedding's vectors: 768 wide, T5's width is not


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5emb")
    tiny = TinyFamily(folder)
    (folder / "emb").mkdir()
    save_file({"emb_params": torch.randn(ROWS, 768)}, str(folder / "emb" / "sd15_style.safetensors"))
    clip = load_clip([tiny.paths["l"], tiny.paths["t5"]], clip_type="flux", embedding_directory=str(folder / "emb"))
    return tiny, clip


def _comfy_t5_sequence(pieces: list[str], min_length: int) -> list[list[tuple[int, float]]]:
    """ComfyUI's T5 tokens after ``process_tokens`` dropped the embedding's ROWS vectors: the
    pieces' ids, ``</s>``, padding to the length the rows counted in, ROWS pads at the end."""
    encode = ref.hf_t5_encode()
    ids = [t for piece in pieces for t in encode(piece)[:-1]] + [1]
    length = max(min_length, len(ids) + ROWS)
    return [[(t, 1.0) for t in ids + [0] * (length - len(ids))]]


@pytest.mark.parametrize("repeat", [1, 60])  # short (256 tokens), and past Flux's 256
def test_wrong_width_embedding_in_a_t5_prompt_is_comfyuis(flux, repeat):
    tiny, clip = flux
    tail = " ".join(["in the snow"] * repeat)
    with pytest.warns(EmbeddingWarning, match="width 768"):  # the CLIP-L part skips it (another width there)
        tokens = clip.tokenize(f"a red fox, embedding:sd15_style {tail}")
    t5 = tokens["t5xxl"][0]
    vectors = [i for i, (t, _) in enumerate(t5) if isinstance(t, torch.Tensor)]
    head = len(ref.hf_t5_encode()("a red fox,")) - 1
    assert vectors == list(range(head, head + ROWS))  # in place, as ComfyUI's token list
    with pytest.warns(EmbeddingWarning, match="wrong width"):
        cond = clip.encode_from_tokens(tokens)
    want = ref.t5_part(tiny.t5, _comfy_t5_sequence(["a red fox,", tail], 256), masked=False)
    assert cond.shape == want.shape and cond.shape[1] == max(256, len(t5))
    assert torch.allclose(cond, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_weights_stay_at_their_positions_as_comfyuis(flux):
    """ComfyUI weights ``z`` by token position after ``process_tokens`` dropped the vectors: the
    weight of ``(in the snow:1.3)`` lands ROWS positions after the tokens it was written on."""
    tiny, clip = flux
    with pytest.warns(EmbeddingWarning):
        tokens = clip.tokenize("a red fox, embedding:sd15_style (in the snow:1.3)")
        cond = clip.encode_from_tokens(tokens)
    weights = [w for _, w in tokens["t5xxl"][0]]  # by position, the vectors' places included
    ids = [t for t, _ in _comfy_t5_sequence(["a red fox,", "in the snow"], 256)[0]]
    want = ref.t5_part(tiny.t5, [list(zip(ids, weights))], masked=False)
    assert 1.3 in weights and torch.allclose(cond, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    unshifted = ref.t5_part(tiny.t5, [list(zip(ids, [w for t, w in tokens["t5xxl"][0]
                                                     if not isinstance(t, torch.Tensor)] + [1.0] * ROWS))],
                            masked=False)
    assert not torch.allclose(cond, unshifted, rtol=0, atol=1e-4 * float(want.abs().max()))
