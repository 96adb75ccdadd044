"""Prompts for the A1111 dialect tests: A1111's doctests, edge cases and long tag prompts."""

from __future__ import annotations

import random

DOCTEST_PROMPTS = [
    "normal text", "an (important) word", "(unbalanced", "\\(literal\\]", "(unnecessary)(parens)",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
]

EDGE_PROMPTS = [
    "", " ", "a", "BREAK", "BREAK a", "a BREAK", "a BREAK BREAK b", "BREAK BREAK", "aBREAK b", "a BREAKb",
    "a\nBREAK\nb", "(a BREAK b)", "[a BREAK b]", "(a BREAK b:1)", "(a BREAK b:-1)", "((a BREAK b))",
    "a (BREAK) b", "(x:-1) BREAK y", "(x:-1)BREAK y", "a BREAK(x:-1)", "BREAK, a, BREAK, b",
    "\\\\", "a \\\\ b", "a \\ b", "\\", "a\\", "\\n", "\\(a\\)", "\\[a\\]", "\\\\(a)", "(a\\)",
    "(a", "[a", "((a", "[[a", "(a [b", "a)", "a]", "a) (b)", ")(a)", "](a)", "a ] [b]", "(a))(b)",
    "a:b", ":", "(a:b)", "(a:1.5", "a:1.5)", "(a: 1.5 )", "(a:+1.5)", "(a:-0.5)", "(a:.5)", "(a:0)",
    "((a:1.5))", "[(a:1.5)]", "[[a]]", "(a)(b)", "(a) (b)", "(a)[b]", "(detailed:1.1)(intricate:1.1)",
    "(a:1.1)(b)", "[a][b]", "[(a)]", "([a])", "a, b, c", ",,,", "a,b,c", "(a, b), c",
    "(masterpiece:1.2), best quality, BREAK, 1girl", "embedding:foo, bar", "(a:1.2)BREAK(b:1.2)",
    "x (y [z (w:1.4)] v) u", "UPPER Case MiXeD", "émoji 🌸 ünïcode", "tab\tand\nnewline",
    "[a:b:0.5]", "[a|b]", "a AND b", "(( (a) ))", "((a)(b))", "(:1.2)", "( :1.2)", "[]", "()",
]

TAGS = [
    "masterpiece", "best quality", "ultra detailed", "1girl", "solo", "long hair", "looking at viewer",
    "smile", "blue eyes", "blonde hair", "dress", "outdoors", "sky", "cloud", "day", "flower field",
    "holding umbrella", "rain", "night city", "neon lights", "cinematic lighting", "depth of field",
    "bokeh", "sharp focus", "intricate details", "highly detailed skin", "volumetric fog",
    "golden hour", "wide shot", "from above", "dynamic pose", "wind", "floating hair", "petals",
    "reflection", "water", "ocean waves", "sunset", "mountains in the distance", "a red fox",
    "oil painting by an old master", "trending on artstation", "8k", "photorealistic", "raw photo",
]


def _tag(rng: random.Random) -> str:
    tag = rng.choice(TAGS)
    style = rng.random()
    if style < 0.15:
        return f"({tag}:{rng.choice(['0.8', '1.1', '1.2', '1.3', '1.5'])})"
    if style < 0.22:
        return f"(({tag}))"
    if style < 0.27:
        return f"[{tag}]"
    return tag


def tag_prompts(count: int, seed: int = 0) -> list[str]:
    """Comma-separated tag prompts of 1 to 4 chunks (commas land everywhere, also
    15-25 tokens from a chunk's end)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        tags = [_tag(rng) for _ in range(rng.randint(20, 90))]
        if rng.random() < 0.15:
            tags.insert(rng.randrange(len(tags)), "BREAK")
        prompts.append(", ".join(tags))
    return prompts


def clause_prompts(count: int, seed: int = 0) -> list[str]:
    """Comma-separated clauses of 6-30 tokens: the last comma before a chunk's end often
    lies 15-25 tokens before it (A1111 moves text for 15-20 at its default of 20)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        clauses = [" ".join(_tag(rng) for _ in range(rng.randint(3, 16))) for _ in range(rng.randint(4, 12))]
        prompts.append(", ".join(clauses))
    return prompts


def long_words_prompt(words: int, seed: int = 0) -> str:
    """A long prompt without commas (no backtracking possible)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(TAGS) for _ in range(words))


ALL_PROMPTS = (DOCTEST_PROMPTS + EDGE_PROMPTS + tag_prompts(40) + clause_prompts(40)
               + [long_words_prompt(n, n) for n in (40, 80, 120)])
