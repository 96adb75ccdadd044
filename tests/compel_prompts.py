"""Prompts compared with the real compel (tests/test_compel_oracle.py, tests/test_compel_sdxl.py),
and a faster way to run compel's own parser on them."""

from __future__ import annotations

import contextlib
from typing import Iterator

LONG_SENTENCES = ("a castle on a hill at dawn. " * 8 + "(soft light)0.6 over the old stone walls. " * 3).strip()
LONG_TAGS = ", ".join(f"tag{i} (detail{i})0.8" if i % 3 == 0 else f"tag{i} detail{i}" for i in range(30))
LONG_WORDS = " ".join(["mountain"] * 70 + ["(river valley forest)0.4"] + ["sky"] * 20)
LONG_SPAN = " ".join(["tree"] * 60) + " (" + " ".join(["cloud"] * 40) + ")0.3 end"
LONG_ZERO = " ".join(["stone"] * 74) + " (moss lichen fern)0 path"

#: construct → prompts (compel syntax). ≥ 100 in all, each compared with compel.
PROMPTS = {
    "plain": ["", "a cat", "fire flames", "fire, flames , fire", "cat hot-dog eating", "Dalí",
              "a photo of an astronaut riding a horse on mars", "x,y,z", "a.b c,d"],
    "up": ["(flames)+", "flames+", '"flames"+', "(flames)++", "fire flames++", "(pretty flowers)+, hot",
           "(flames)1.3", "(fire flames)1.5 on a hill", "flames.attend(1.4)", "(flames).attend(+)",
           "a (red)2.0 ball", "(x)1.", "(x).5 y"],
    "down": ["(flames)-", "flames-", '"flames"-', "(flames)--", "(flames)0.5", "fire (flames)0.5",
             "flowers fire-- flames", "(flowers)--- flames+++", "a (red)0.2 ball", "(fire flames).attend(0.5)",
             "a cat (sitting)0.7 on (a mat)0.3", "(a)0.5 (b)0.5 c", "(a)0.5 (b)0.6 c", "(a b c d e)0.9 f",
             "(x)-0.5", "a (b (c)0.5)0.5 d", "start (middle)0.01 end", "(flames)--, (smoke)-- and fire"],
    "zero": ["(cat)0", "a (cat)0 on a mat", "(a)0 (b)0 c", "(dog)0.0 and (cat)0.5", "(x)0 (y)1.5"],
    "nested": ["fire (flames (trees)1.5)2.0", "hairy (mountain (\\(man\\))+)+", "(a (b (c)1.2)0.8)1.1",
               "((((deep))))1.2", "hamburger ((bun))", "(a (ba)dly (f)ormed +test prompt",
               "(((a badly (formed +test )prompt", "(a, (b, c)0.8, d)1.1"],
    "escapes": ["mountain \\(man\\)", "mountain (\\(man)\\)", "mountain (\\(man\\))+", '"mountain" (\\(man\\))+',
                '\\"mountain\\" (\\(man\\))+', "(\\\"mountain\\\")+ (\\(man\\))-", "mountain (\\(man\\))1.1",
                'hairy ("mountain, man" with a (beard)2.0)+', 'hairy ("mountain, \\"man\\"" with a (beard)2.0)+',
                'hai\\(ry ("mountain, \\\\"man\\" w\\)ith a (beard)2.0)+', "word\\, x", "a \\+ b",
                'hairy ("mountain, man" with a beard+)+', "a badly (formed test prompt", "(a=b) c", "(cat:1.3)"],
    "blend": ['("fire", "fire flames").blend(0.7, 0.3)', '("mountain", "man").blend()', "(mountain, man).blend()",
              "((mountain), (tall man)).blend()", '("fire", "fire flames (hot)++", "hi").blend(0.7, 0.3, 1.0)',
              '("fire").blend(0.7)', '("fire", "").blend(0.7, 1)', '("fire", "  ,  ").blend(0.7, 1)',
              '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-1,no_normalize)',
              '("mountain, man, hairy", "face, teeth, eyes--").blend(1,-0.5)',
              '("a (red)0.3 cat", "a (blue)0 dog").blend(0.6, 0.4)', '("((a badly (formed +test ").blend(1.0)',
              '("fire (flames)++", "mountain (man)2").blend(1,1)'],
    "and": ['("fire", "flames").and(1,1)', '("fire", "flames").and()', '("(fire)2.0", "flames-").and()',
            '("fire", "flames", "mountain man").and()', '("fire", "flames").and(2,1)', '("fire", "flames").and(1, 0.5)',
            '("mountain man", "a person with a hat (riding a bicycle)++").and(0.5, 0.5)', "(cat, dog).and()",
            '("a (cat)0.5 sits", "on a (mat)0").add(1, 0.7)', '("a", "b").and() ignored by compel'],
    "raw": ["cat,(dog)0.5", "A Photo,(OF)1.2 a CAT", "a\tcat (dog)0.5", "café (naïve)0.7 “quoted” text",
            "(" + "word " * 40 + ")1.1 " + "x " * 30, "a cat\\, (sat)0.9 ; on: it", "  padded   (gap)0.8  "],
    "long": [LONG_SENTENCES, LONG_TAGS, LONG_WORDS, LONG_SPAN, LONG_ZERO,
             " ".join(f"word{i}" for i in range(80)), "(" + " ".join(["blue"] * 90) + ")0.5",
             "(" + " ".join(["red"] * 90) + ")1.2 sky", LONG_SENTENCES + " " + LONG_TAGS],
}
ALL = [p for group in PROMPTS.values() for p in group]


@contextlib.contextmanager
def one_compel_parser(compel) -> Iterator[object]:
    """compel builds its pyparsing grammar anew for every prompt and parses without
    memoization (seconds for nested brackets here); parse with one built grammar and
    pyparsing's packrat cache instead. Same parser code, same results, 5x faster."""
    import pyparsing
    import pytest
    from compel.prompt_parser import PromptParser

    pyparsing.ParserElement.enable_packrat()
    parser = PromptParser()
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(compel.Compel, "parse_prompt_string",
                          classmethod(lambda cls, s: parser.parse_conjunction(s)))
            yield parser
    finally:
        pyparsing.ParserElement.disable_memoization()


def and_weighted(parser, prompt: str) -> bool:
    """Whether compel's parse of ``prompt`` has an ``.and()`` weight other than 1.

    compel with ``requires_pooled`` crashes on those (AttributeError): to weight a
    part it pads against ``build_conditioning_tensor('')``, which then returns a
    ``(cond, pooled)`` tuple instead of a tensor (compel 2.5.1, ``compel.py``).
    """
    return any(weight != 1 for weight in parser.parse_conjunction(prompt).weights)


def has_blend(parser, prompt: str) -> bool:
    """Whether compel's parse of ``prompt`` is a ``.blend()``.

    compel's multi-encoder ``Compel(tokenizer=[...], text_encoder=[...])`` (its SDXL
    setup) crashes on those (TypeError): a blend keeps the first member's
    tokenization, which is then a list of one tensor per encoder, and
    ``torch.concat`` refuses it (compel 2.5.1, ``compel.py``).
    """
    from compel.prompt_parser import Blend

    return any(isinstance(part, Blend) for part in parser.parse_conjunction(prompt).prompts)


def compel_structure(parser, prompt: str):
    """compel's parse as ``[(and_weight, blend_weights|None, normalize, [[(text, weight)]])]``."""
    from compel.prompt_parser import Blend

    conjunction = parser.parse_conjunction(prompt)
    out = []
    for part, weight in zip(conjunction.prompts, conjunction.weights):
        members = part.prompts if isinstance(part, Blend) else [part]
        blend = tuple(part.weights) if isinstance(part, Blend) else None
        normalize = part.normalize_weights if isinstance(part, Blend) else True
        out.append((weight, blend, normalize, [[(f.text, f.weight) for f in m.children] for m in members]))
    return out


def textenc_structure(prompt: str):
    """textenc's compel parse in the shape of :func:`compel_structure`."""
    from textenc.prompts.dialects.compel import parse_compel

    return [(p.weight, p.blend_weights, p.normalize, [[(f.text, f.weight) for f in m.fragments] for m in p.members])
            for p in parse_compel(prompt).parts]
