"""ComfyUI's prompt rules, restated plainly: the oracle of the tests and the baseline of
``bench/bench_prompt.py``. FOR COMPARISON ONLY.

Written from ComfyUI's published ``comfy/sd1_clip.py`` (``parse_parentheses``,
``token_weights``, ``escape_important``, ``SDTokenizer.tokenize_with_weights``,
``ClipTokenWeightEncoder.encode_token_weights``), never imported from it, keeping its
structure on purpose (recursion, a sentinel for escaped brackets, one
``transformers.CLIPTokenizer`` call per unit of text, the empty prompt in the same batch
on every weighted call, tokens weighted one at a time in a Python loop), so the bench
measures what textenc's prompt machinery saves. Embeddings are read as
``_try_get_embedding`` reads them, from a ``{name: tensor}`` mapping standing in for
the folder (``load_embed``'s file reading is not restated); ``BREAK`` is not handled;
the model forward under :func:`comfy_encode_token_weights` is the caller's.

Tests import it by name (``tests/`` is on ``sys.path`` under pytest); the bench puts
``tests/`` on its path.
"""

from __future__ import annotations

import re

import torch

EMBEDDING_IDENTIFIER = "embedding:"
_ESCAPED_CLOSE, _ESCAPED_OPEN = "\0\1", "\0\2"  # ComfyUI's sentinels for "\)" and "\("


def parse_parentheses(string: str) -> list[str]:
    """``string`` cut into top-level ``(...)`` groups and the text between them."""
    result, current, nesting = [], "", 0
    for char in string:
        if char == "(":
            if nesting == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            nesting += 1
        elif char == ")":
            nesting -= 1
            if nesting == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def token_weights(string: str, current_weight: float, a1111: bool = False) -> list[tuple[str, float]]:
    """(text, weight) pieces of an escaped ``string``: ``(x)`` is 1.1x its surroundings,
    ``(x:w)`` weight ``w`` (``float()``'s reading); with ``a1111``, ``w`` times its
    surroundings (A1111's convention)."""
    out = []
    for x in parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            colon = x.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    value = float(x[colon + 1:])
                except ValueError:
                    pass
                else:
                    weight = current_weight * value if a1111 else value
                    x = x[:colon]
            out += token_weights(x, weight, a1111)
        else:
            out += [(x, current_weight)]
    return out


def escape_important(text: str) -> str:
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def unescape_important(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def prompt_weights(text: str, a1111: bool = False) -> list[tuple[str, float]]:
    """ComfyUI's reading of a whole prompt: (text, weight) pieces, escapes undone."""
    return [(unescape_important(t), w) for t, w in token_weights(escape_important(text), 1.0, a1111)]


class ComfyTokenizer:
    """ComfyUI's ``SDTokenizer.tokenize_with_weights`` over an HF ``CLIPTokenizer``."""

    def __init__(self, hf_tokenizer, *, max_length: int = 77, pad_with_end: bool = True,
                 embeddings: dict[str, torch.Tensor] | None = None) -> None:
        self.tokenizer = hf_tokenizer
        self.embeddings = embeddings  # None: no embedding directory
        empty = hf_tokenizer("")["input_ids"]
        self.start_token, self.end_token = empty[0], empty[1]
        self.pad_token = self.end_token if pad_with_end else 0
        self.max_length = max_length
        self.max_word_length = 8

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False) -> list[list[tuple]]:
        groups = []
        for segment, weight in token_weights(escape_important(text), 1.0):
            pieces = re.split(f" {EMBEDDING_IDENTIFIER}|\n{EMBEDDING_IDENTIFIER}", unescape_important(segment))
            pieces = [pieces[0]] + [EMBEDDING_IDENTIFIER + p for p in pieces[1:]]
            for word in (p for p in pieces if p != ""):
                if word.startswith(EMBEDDING_IDENTIFIER) and self.embeddings is not None:
                    embed, word = self._try_get_embedding(word[len(EMBEDDING_IDENTIFIER):].strip("\n"))
                    if embed is not None:
                        rows = [embed] if embed.ndim == 1 else [embed[x] for x in range(embed.shape[0])]
                        groups.append([(row, weight) for row in rows])  # zero rows: an empty group
                    if word == "":
                        continue
                groups.append([(t, weight) for t in self.tokenizer(word)["input_ids"][1:-1]])
        windows = [[(self.start_token, 1.0, 0)]]
        batch = windows[0]
        for i, group in enumerate(groups):
            is_large = len(group) >= self.max_word_length
            while group:
                if len(group) + len(batch) > self.max_length - 1:
                    remaining = self.max_length - len(batch) - 1
                    if is_large:
                        batch.extend((t, w, i + 1) for t, w in group[:remaining])
                        batch.append((self.end_token, 1.0, 0))
                        group = group[remaining:]
                    else:
                        batch.append((self.end_token, 1.0, 0))
                        batch.extend([(self.pad_token, 1.0, 0)] * remaining)
                    batch = [(self.start_token, 1.0, 0)]
                    windows.append(batch)
                else:
                    batch.extend((t, w, i + 1) for t, w in group)
                    group = []
        batch.append((self.end_token, 1.0, 0))
        batch.extend([(self.pad_token, 1.0, 0)] * (self.max_length - len(batch)))
        if not return_word_ids:
            return [[(t, w) for t, w, _ in window] for window in windows]
        return windows

    def _try_get_embedding(self, name_and_rest: str) -> tuple[torch.Tensor | None, str]:
        """(the embedding or None, the text left after its name); IndexError on a blank name."""
        words = name_and_rest.split()
        name, leftover = words[0], " ".join(words[1:])
        embed = self.embeddings.get(name)
        if embed is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):
                return self.embeddings.get(stripped), f"{name[len(stripped):]} {leftover}"
        return embed, leftover


def comfy_encode_token_weights(model, token_weight_pairs) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's ``ClipTokenWeightEncoder.encode_token_weights`` on ``model``'s forward."""
    to_encode = [[t for t, *_ in window] for window in token_weight_pairs]
    sections = len(to_encode)
    has_weights = any(w != 1.0 for window in token_weight_pairs for _, w, *_ in window)
    if has_weights or sections == 0:
        to_encode.append(model.gen_empty_tokens(model.special_tokens, model.max_length))
    out, pooled = model(to_encode)[:2]
    first_pooled = pooled[0:1]
    output = []
    for k in range(sections):
        z = out[k:k + 1]
        if has_weights:
            z_empty = out[-1]
            for i in range(len(z)):
                for j in range(len(z[i])):
                    weight = token_weight_pairs[k][j][1]
                    if weight != 1.0:
                        z[i][j] = (z[i][j] - z_empty[j]) * weight + z_empty[j]
        output.append(z)
    if not output:
        return out[-1:], first_pooled
    return torch.cat(output, dim=-2), first_pooled
