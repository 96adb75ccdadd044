"""A straightforward ComfyUI-style prompt pipeline, FOR COMPARISON ONLY.

Written from ComfyUI's published ``comfy/sd1_clip.py`` (``token_weights``,
``escape_important``, ``SDTokenizer.tokenize_with_weights``,
``ClipTokenWeightEncoder.encode_token_weights``) to measure what textenc's
prompt machinery saves. It keeps ComfyUI's structure on purpose:

* tokenizing calls ``transformers.CLIPTokenizer`` once per unit of text;
* encoding puts the empty prompt in the same batch on every weighted call,
  and weights tokens one at a time in a Python loop.

The model forward underneath is textenc's own (``SDClipModel.forward``), so
only the prompt machinery differs. Embeddings and ``BREAK`` are not handled.
"""

from __future__ import annotations

import re

import torch

EMBEDDING_IDENTIFIER = "embedding:"


def parse_parentheses(string: str) -> list[str]:
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


def token_weights(string: str, current_weight: float) -> list[tuple[str, float]]:
    out = []
    for x in parse_parentheses(string):
        weight = current_weight
        if len(x) >= 2 and x[-1] == ")" and x[0] == "(":
            x = x[1:-1]
            colon = x.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    weight = float(x[colon + 1:])
                    x = x[:colon]
                except ValueError:
                    pass
            out += token_weights(x, weight)
        else:
            out += [(x, current_weight)]
    return out


def escape_important(text: str) -> str:
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text: str) -> str:
    return text.replace("\0\1", ")").replace("\0\2", "(")


class ComfyTokenizer:
    """ComfyUI's ``SDTokenizer.tokenize_with_weights`` over an HF ``CLIPTokenizer``."""

    def __init__(self, hf_tokenizer, *, max_length: int = 77, pad_with_end: bool = True) -> None:
        self.tokenizer = hf_tokenizer
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
