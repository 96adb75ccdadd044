"""Test oracle: AUTOMATIC1111's prompt pipeline restated step by step.

This follows the structure of A1111's own code (``modules/prompt_parser.py``:
``parse_prompt_attention``, the lark schedule grammar with
``get_learned_conditioning_prompt_schedules`` and ``get_multicond_prompt_list``;
``modules/sd_hijack_clip.py``: ``tokenize_line``, ``forward``,
``process_tokens``; ``modules/sd_emphasis.py``: "Original" / "No norm"),
on ``transformers.CLIPTokenizer`` and ``transformers.CLIPTextModel``. It
uses none of textenc's code, so textenc can be checked against it.
"""

from __future__ import annotations

import re

import torch

CHUNK_LENGTH = 75

# ---- prompt_parser.parse_prompt_attention ------------------------------------

re_attention = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    res = []
    round_brackets = []
    square_brackets = []

    def multiply_range(start_position, multiplier):
        for p in range(start_position, len(res)):
            res[p][1] *= multiplier

    for m in re_attention.finditer(text):
        text = m.group(0)
        weight = m.group(1)
        if text.startswith("\\"):
            res.append([text[1:], 1.0])
        elif text == "(":
            round_brackets.append(len(res))
        elif text == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif text == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif text == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            parts = re.split(re_break, text)
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# ---- prompt_parser schedules (lark, as A1111) -----------------------------------

SCHEDULE_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
_PARSER = []


def get_learned_conditioning_prompt_schedules(prompts, steps):
    import lark

    if not _PARSER:
        _PARSER.append(lark.Lark(SCHEDULE_GRAMMAR))
    schedule_parser = _PARSER[0]

    def collect_steps(steps, tree):
        res = [steps]

        class CollectSteps(lark.Visitor):
            def scheduled(self, tree):
                s = tree.children[-2]
                v = float(s)
                if "." in s:
                    v = v * steps
                tree.children[-2] = min(steps, int(v))
                if tree.children[-2] >= 1:
                    res.append(tree.children[-2])

            def alternate(self, tree):
                res.extend(range(1, steps + 1))

        CollectSteps().visit(tree)
        return sorted(set(res))

    def at_step(step, tree):
        class AtStep(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                def flatten(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for gen in x:
                            yield from flatten(gen)
                return "".join(flatten(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                for child in children:
                    yield child
        return AtStep().transform(tree)

    def get_schedule(prompt):
        try:
            tree = schedule_parser.parse(prompt)
        except lark.exceptions.LarkError:
            return [[steps, prompt]]
        return [[t, at_step(t, tree)] for t in collect_steps(steps, tree)]

    promptdict = {prompt: get_schedule(prompt) for prompt in set(prompts)}
    return [promptdict[prompt] for prompt in prompts]


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompt):
    """One prompt's ``[(text, weight), ...]`` (A1111 also dedupes texts; same result)."""
    out = []
    for subprompt in re_AND.split(prompt):
        match = re_weight.search(subprompt)
        text, weight = match.groups() if match is not None else (subprompt, 1.0)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


# ---- sd_hijack_clip ------------------------------------------------------------

class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class Embedding:
    def __init__(self, vec, name):
        self.vec, self.name, self.vectors = vec, name, vec.shape[0]


class EmbeddingDatabase:
    """``textual_inversion.EmbeddingDatabase``'s lookup by name tokens."""

    def __init__(self, tokenizer, embeddings):
        self.ids_lookup = {}
        for name, vec in embeddings.items():
            ids = tokenizer([name], truncation=False, add_special_tokens=False)["input_ids"][0]
            first_id = ids[0]
            self.ids_lookup.setdefault(first_id, [])
            self.ids_lookup[first_id] = sorted(self.ids_lookup[first_id] + [(ids, Embedding(vec, name))],
                                               key=lambda x: len(x[0]), reverse=True)

    def find_embedding_at_position(self, tokens, offset):
        possible_matches = self.ids_lookup.get(tokens[offset], None)
        if possible_matches is None:
            return None, None
        for ids, embedding in possible_matches:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None


class A1111Clip:
    """``FrozenCLIPEmbedderWithCustomWords`` (id_pad = id_end) or the OpenCLIP
    variant (``id_pad=0``) around a transformers tokenizer and text model."""

    def __init__(self, tokenizer, model=None, *, id_pad=None, comma_padding_backtrack=20,
                 emphasis="Original", embeddings=None, stop_at_last_layers=1, final_norm=True):
        self.tokenizer, self.model = tokenizer, model
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.id_pad = self.id_end if id_pad is None else id_pad
        self.comma_token = tokenizer.get_vocab().get(",</w>", None)
        self.comma_padding_backtrack = comma_padding_backtrack
        self.emphasis = emphasis
        self.embedding_db = EmbeddingDatabase(tokenizer, embeddings or {})
        self.stop_at_last_layers = stop_at_last_layers
        self.final_norm = final_norm  # False: SDXL's penultimate layer as is (its layer="hidden")
        self.fixes = None
        self.pooled = None

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (CHUNK_LENGTH + 1)
        chunk.multipliers = [1.0] * (CHUNK_LENGTH + 2)
        return chunk

    def tokenize_line(self, line):
        parsed = parse_prompt_attention(line) if self.emphasis != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last=False):
            nonlocal token_count, last_comma, chunk
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            if to_add > 0:
                chunk.tokens += [self.id_end] * to_add
                chunk.multipliers += [1.0] * to_add
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (self.comma_padding_backtrack != 0 and len(chunk.tokens) == CHUNK_LENGTH
                      and last_comma != -1 and len(chunk.tokens) - last_comma <= self.comma_padding_backtrack):
                    break_location = last_comma + 1
                    reloc_tokens = chunk.tokens[break_location:]
                    reloc_mults = chunk.multipliers[break_location:]
                    chunk.tokens = chunk.tokens[:break_location]
                    chunk.multipliers = chunk.multipliers[:break_location]
                    next_chunk()
                    chunk.tokens = reloc_tokens
                    chunk.multipliers = reloc_mults
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                embedding, embedding_length_in_tokens = self.embedding_db.find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                emb_len = int(embedding.vectors)
                if len(chunk.tokens) + emb_len > CHUNK_LENGTH:
                    next_chunk()
                chunk.fixes.append((len(chunk.tokens), embedding))
                chunk.tokens += [0] * emb_len
                chunk.multipliers += [weight] * emb_len
                position += embedding_length_in_tokens
        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def process_texts(self, texts):
        cache, batch_chunks = {}, []
        for line in texts:
            if line not in cache:
                cache[line] = self.tokenize_line(line)[0]
            batch_chunks.append(cache[line])
        return batch_chunks

    def forward(self, texts):
        batch_chunks = self.process_texts(texts)
        chunk_count = max(len(x) for x in batch_chunks)
        zs = []
        for i in range(chunk_count):
            batch_chunk = [chunks[i] if i < len(chunks) else self.empty_chunk() for chunks in batch_chunks]
            tokens = [x.tokens for x in batch_chunk]
            multipliers = [x.multipliers for x in batch_chunk]
            self.fixes = [x.fixes for x in batch_chunk]
            zs.append(self.process_tokens(tokens, multipliers))
            if i == 0:
                self.first_pooled = self.pooled  # A1111 returns zs[0].pooled
        return torch.hstack(zs)

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        tokens = torch.asarray(remade_batch_tokens)
        if self.id_end != self.id_pad:
            for batch_pos in range(len(remade_batch_tokens)):
                index = remade_batch_tokens[batch_pos].index(self.id_end)
                tokens[batch_pos, index + 1:tokens.shape[1]] = self.id_pad
        z = self.encode_with_transformers(tokens)
        multipliers = torch.asarray(batch_multipliers)
        if self.emphasis == "Original":
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            new_mean = z.mean()
            z = z * (original_mean / new_mean)
        elif self.emphasis == "No norm":
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
        return z

    def _embeddings_with_fixes(self, module, args, output):
        """``sd_hijack.EmbeddingsWithFixes.forward``: the fixes go in after the start token."""
        batch_fixes, self.fixes = self.fixes, None
        if not batch_fixes or max(len(x) for x in batch_fixes) == 0:
            return output
        vecs = []
        for fixes, tensor in zip(batch_fixes, output):
            for offset, embedding in fixes:
                emb = embedding.vec.to(tensor.dtype)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0:offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len:]])
            vecs.append(tensor)
        return torch.stack(vecs)

    def encode_with_transformers(self, tokens):
        hook = self.model.text_model.embeddings.token_embedding.register_forward_hook(self._embeddings_with_fixes)
        try:
            with torch.no_grad():
                outputs = self.model(input_ids=tokens, output_hidden_states=True)
        finally:
            hook.remove()
        self.pooled = getattr(outputs, "text_embeds", None)
        if self.stop_at_last_layers > 1:
            z = outputs.hidden_states[-self.stop_at_last_layers]
            if not self.final_norm:
                return z
            with torch.no_grad():
                return self.model.text_model.final_layer_norm(z)
        return outputs.last_hidden_state


def reference_window_tokens(clip: A1111Clip, chunk: PromptChunk) -> list[int]:
    """A chunk's 77 token ids after ``process_tokens``' pad rewrite."""
    tokens = list(chunk.tokens)
    if clip.id_end != clip.id_pad:
        index = tokens.index(clip.id_end)
        tokens[index + 1:] = [clip.id_pad] * (len(tokens) - index - 1)
    return tokens


def step_of_entry(schedule, step):
    """``reconstruct_cond_batch``: the entry A1111 uses at 0-based ``step``."""
    for index, (end_at_step, _) in enumerate(schedule):
        if step <= end_at_step:
            return index
    return 0


__all__ = ["parse_prompt_attention", "get_learned_conditioning_prompt_schedules",
           "get_multicond_prompt_list", "A1111Clip", "reference_window_tokens", "step_of_entry"]
