"""Test oracle for the A1111 dialect, written from AUTOMATIC1111's documented rules.

Nothing here is taken from A1111's code, and it shares no code or structure with
``textenc/dialects/a1111``: it is a second, independent reading of the same rules
(A1111's wiki on attention/emphasis, prompt editing, alternating words and BREAK, its
parser's doctest examples, and the rules written out in the dialect's docstrings and
docs/prompts.md). Where the product tokenizes with a regular expression, this scans
character by character and defers the bracket products; where the product parses the
schedule with functions over ``(text, index)``, this is a cursor-based reader that
builds a tree; where the product chunks in one loop, this first flattens the prompt
into a stream of items and then packs them.

Tokenizing and encoding use ``transformers.CLIPTokenizer`` and ``transformers``' CLIP
text models, never textenc's tokenizer or encoder.

Rules restated (the oracle's own wording):

Attention. ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` by 1/1.1, and
``(x:w)`` by ``w`` (``w`` is ``[+-]?[.0-9]+`` with optional white space around it).
A closing bracket multiplies what was written since its own opening bracket; round
and square brackets are matched separately. Brackets still open at the end weigh the
rest of the prompt: the round ones first, then the square ones. ``\\(``, ``\\)``,
``\\[``, ``\\]`` and ``\\\\`` stand for the character; any other backslash is
dropped (it leaves an empty piece of weight 1). A stray closer, a ``:`` that starts
no weight, and a ``:w)`` with no ``(`` open are text. Inside each run of plain text,
the word ``BREAK`` (with the white space around it) is a break marker of weight -1,
which the brackets around it multiply like any text. Neighbours of equal weight are
joined; an empty prompt is one empty piece.

Chunks. Each piece is tokenized on its own. Tokens fill chunks of 75; when a chunk is
full and a non-comma token comes, and the chunk's last comma is at most ``backtrack``
tokens from its end, the tokens after that comma start the next chunk. A break closes
the current chunk, even an empty one. A textual inversion (its name's tokens) takes
one slot per vector and starts a new chunk when it does not fit. A chunk is padded
with the end token to 75 and wrapped in start/end; with another pad id, everything
after the first end token becomes the pad id.

Schedules and AND: see :func:`oracle_schedule` and :func:`oracle_and_parts`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

CHUNK_TOKENS = 75
WINDOW_TOKENS = CHUNK_TOKENS + 2
ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
BREAK_MARK = ("BREAK", -1.0)

# ---- attention -------------------------------------------------------------------

_ATTENTION_SPECIAL = frozenset("\\()[]:")
_ESCAPABLE = frozenset("()[]\\")
_BREAK_SPLIT = re.compile(r"\s*(?<!\w)BREAK(?!\w)\s*")


def _weight_literal_at(text: str, colon: int) -> tuple[str, int] | None:
    """If ``:`` at ``colon`` starts ``: w )``, the literal ``w`` and the index after ``)``."""
    n, j = len(text), colon + 1
    while j < n and text[j].isspace():
        j += 1
    begin = j
    if j < n and text[j] in "+-":
        j += 1
    body = j
    while j < n and (text[j] == "." or text[j].isdecimal()):
        j += 1
    if j == body:
        return None
    literal = text[begin:j]
    while j < n and text[j].isspace():
        j += 1
    return (literal, j + 1) if j < n and text[j] == ")" else None


def _append_run(pieces: list[list], run: str) -> None:
    """Add a run of plain text, cut at each ``BREAK`` word."""
    for index, part in enumerate(_BREAK_SPLIT.split(run)):
        if index:
            pieces.append(list(BREAK_MARK))
        pieces.append([part, 1.0])


def oracle_attention(prompt: str) -> list[list]:
    """``prompt`` as ``[[text, weight], ...]`` by A1111's attention rules.

    Raises ValueError for a ``(x:w)`` whose ``w`` is no number, as A1111 does.
    """
    pieces: list[list] = []
    products: list[tuple[int, int, float]] = []  # (first piece, stop, factor), in order
    round_opened: list[int] = []
    square_opened: list[int] = []
    i = 0
    while i < len(prompt):
        char = prompt[i]
        if char == "\\":
            follower = prompt[i + 1:i + 2]
            escaped = bool(follower) and follower in _ESCAPABLE
            pieces.append([follower if escaped else "", 1.0])
            i += 2 if escaped else 1
        elif char in "([":
            (round_opened if char == "(" else square_opened).append(len(pieces))
            i += 1
        elif char == ":":
            found = _weight_literal_at(prompt, i)
            if found is None:
                _append_run(pieces, ":")
                i += 1
            elif round_opened:
                products.append((round_opened.pop(), len(pieces), float(found[0])))
                i = found[1]
            else:
                _append_run(pieces, prompt[i:found[1]])
                i = found[1]
        elif char == ")" and round_opened:
            products.append((round_opened.pop(), len(pieces), ROUND_FACTOR))
            i += 1
        elif char == "]" and square_opened:
            products.append((square_opened.pop(), len(pieces), SQUARE_FACTOR))
            i += 1
        elif char in ")]":
            _append_run(pieces, char)
            i += 1
        else:
            stop = i
            while stop < len(prompt) and prompt[stop] not in _ATTENTION_SPECIAL:
                stop += 1
            _append_run(pieces, prompt[i:stop])
            i = stop
    end = len(pieces)
    products += [(first, end, ROUND_FACTOR) for first in round_opened]
    products += [(first, end, SQUARE_FACTOR) for first in square_opened]
    return _weigh_and_join(pieces, products)


def _weigh_and_join(pieces: list[list], products: list[tuple[int, int, float]]) -> list[list]:
    """Apply the bracket products in order, then join neighbours of equal weight."""
    for first, stop, factor in products:
        for piece in pieces[first:stop]:
            piece[1] *= factor
    joined: list[list] = []
    for piece in pieces:
        if joined and joined[-1][1] == piece[1]:
            joined[-1][0] += piece[0]
        else:
            joined.append(piece)
    return joined or [["", 1.0]]


# ---- prompt editing / alternation ---------------------------------------------------

_DIGITS = frozenset("0123456789")


class _GroupFails(Exception):
    """A bracket group does not close as the grammar wants."""


class _Unreadable(Exception):
    """No reading of the prompt exists (then A1111 uses it as written)."""


@dataclass
class _Edit:
    before: list | None
    after: list
    literal: str


@dataclass
class _Alternation:
    options: list


class _ScheduleReader:
    """A cursor over the prompt; groups are read recursively and give up with
    :class:`_GroupFails`. Plain text: anything but ``\\ [ ] ( ) : |``, or a backslash
    with the character after it (not a line break). Inside a group, ``(`` and ``[``
    must open groups: ``( p )``, ``( p : p )``, ``[ p ]``, ``[ p : N ]``,
    ``[ p : p : N ]``, ``[ p | p | ... ]``. At the top level a group that fails leaves
    its opener as text, as are ``] ) :``; a ``|`` or a bad backslash there means no
    reading exists. A group that closes is always taken."""

    def __init__(self, text: str):
        self.text, self.at = text, 0

    def peek(self) -> str:
        return self.text[self.at] if self.at < len(self.text) else ""

    def escaped_pair(self) -> str | None:
        after = self.text[self.at + 1:self.at + 2]
        return None if after in ("", "\n") else self.text[self.at:self.at + 2]

    def inner(self) -> list:
        nodes: list = []
        while (char := self.peek()) not in ("", "]", ")", ":", "|"):
            if char in "([":
                nodes.extend(self.group())
            elif char == "\\":
                pair = self.escaped_pair()
                if pair is None:
                    raise _GroupFails
                nodes.append(pair)
                self.at += 2
            else:
                nodes.append(char)
                self.at += 1
        return nodes

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _GroupFails
        self.at += 1

    def number_and_close(self) -> str | None:
        """``ws? SIGNED_NUMBER ws? ]`` here: the number (cursor after ``]``), else None."""
        text, j = self.text, self.at
        while j < len(text) and text[j].isspace():
            j += 1
        begin = j
        if j < len(text) and text[j] in "+-":
            j += 1
        whole = j
        while j < len(text) and text[j] in _DIGITS:
            j += 1
        has_whole = j > whole
        has_fraction = False
        if j < len(text) and text[j] == ".":
            k = j + 1
            while k < len(text) and text[k] in _DIGITS:
                k += 1
            has_fraction = k > j + 1
            if has_whole or has_fraction:
                j = k
        if not (has_whole or has_fraction):
            return None
        if j < len(text) and text[j] in "eE":
            k = j + 1 + (text[j + 1:j + 2] in ("+", "-") and j + 1 < len(text))
            digits = k
            while k < len(text) and text[k] in _DIGITS:
                k += 1
            j = k if k > digits else j
        literal = text[begin:j]
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "]":
            self.at = j + 1
            return literal
        return None

    def group(self) -> list:
        opener = self.peek()
        self.at += 1
        first = self.inner()
        if opener == "(":
            if self.peek() == ")":
                self.at += 1
                return ["(", *first, ")"]
            self.expect(":")
            second = self.inner()
            self.expect(")")
            return ["(", *first, ":", *second, ")"]
        follower = self.peek()
        if follower == "]":
            self.at += 1
            return ["[", *first, "]"]
        if follower == "|":
            options = [first]
            while self.peek() == "|":
                self.at += 1
                options.append(self.inner())
            self.expect("]")
            return [_Alternation(options)]
        self.expect(":")
        mark = self.at
        literal = self.number_and_close()
        if literal is not None:
            return [_Edit(None, first, literal)]
        self.at = mark
        second = self.inner()
        self.expect(":")
        literal = self.number_and_close()
        if literal is None:
            raise _GroupFails
        return [_Edit(first, second, literal)]

    def whole(self) -> list:
        nodes: list = []
        while (char := self.peek()) != "":
            if char in "([":
                start = self.at
                try:
                    nodes.extend(self.group())
                    continue
                except _GroupFails:
                    self.at = start + 1
                    nodes.append(char)
            elif char == "|":
                raise _Unreadable
            elif char == "\\":
                pair = self.escaped_pair()
                if pair is None:
                    raise _Unreadable
                nodes.append(pair)
                self.at += 2
            else:
                nodes.append(char)
                self.at += 1
        return nodes


def _switch_step(literal: str, steps: int) -> int:
    """A literal with a ``.`` is a fraction of ``steps``; the step is capped at ``steps``."""
    value = float(literal) * (steps if "." in literal else 1)
    return min(steps, int(value))


def _change_steps(nodes: list | None, steps: int, into: set[int]) -> None:
    for node in nodes or ():
        if isinstance(node, _Edit):
            step = _switch_step(node.literal, steps)
            if step >= 1:
                into.add(step)
            _change_steps(node.before, steps, into)
            _change_steps(node.after, steps, into)
        elif isinstance(node, _Alternation):
            into.update(range(1, steps + 1))
            for option in node.options:
                _change_steps(option, steps, into)


def _text_at(nodes: list | None, step: int, steps: int) -> str:
    out = ""
    for node in nodes or ():
        if isinstance(node, _Edit):
            chosen = node.before if step <= _switch_step(node.literal, steps) else node.after
            out += _text_at(chosen, step, steps)
        elif isinstance(node, _Alternation):
            out += _text_at(node.options[(step - 1) % len(node.options)], step, steps)
        else:
            out += node
    return out


def oracle_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """``[(last_step, text), ...]``: ``text`` is used at 0-based steps up to ``last_step``.

    ``[a:b:N]`` is ``a`` up to step N then ``b``; ``[b:N]`` and ``[a::N]`` leave one side
    empty; N with a ``.`` is a fraction of ``steps``. ``[a|b|c]`` cycles one option per
    step. A prompt without a reading is used as written.
    """
    try:
        tree = _ScheduleReader(prompt).whole()
    except _Unreadable:
        return [(steps, prompt)]
    changes = {steps}
    _change_steps(tree, steps, changes)
    return [(step, _text_at(tree, step, steps)) for step in sorted(changes)]


_AND_WORD = re.compile(r"(?<!\w)AND(?!\w)")
_PART_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def oracle_and_parts(prompt: str) -> list[tuple[str, float]]:
    """``AND`` (a whole word) separates parts; a part ending in ``:number`` (white space
    allowed around both) takes that weight, else 1. Trailing white space is dropped."""
    parts = []
    for part in _AND_WORD.split(prompt):
        head, colon, tail = part.rpartition(":")
        if colon and _PART_NUMBER.fullmatch(tail.strip()):
            parts.append((head.rstrip(), float(tail.strip())))
        else:
            parts.append((part.rstrip(), 1.0))
    return parts


def active_entry(schedule: list[tuple[int, str]], step: int) -> int:
    """Index of the entry used at 0-based ``step`` (the first whose last step is >= it)."""
    return next((index for index, (last, _) in enumerate(schedule) if step <= last), 0)


# ---- chunks and encoding on transformers -----------------------------------------------


@dataclass
class OracleChunk:
    """A 77-token window (start, 75 tokens, end) before any pad rewrite.

    ``vectors`` are ``(slot, rows)``: embedding rows for window positions ``slot + 1``...
    """

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[tuple[int, torch.Tensor]] = field(default_factory=list)


@dataclass
class _Item:
    kind: str  # "token", "vectors" or "break"
    first_id: int = -1
    weight: float = 1.0
    rows: torch.Tensor | None = None


class OracleClip:
    """A1111-style chunking and encoding on a transformers tokenizer and text model.

    ``emphasis``: ``"Original"`` (weights, then the batch mean restored), ``"No norm"``
    (weights only) or ``"Ignore"``. ``skip`` > 1 takes ``hidden_states[-skip]``, through
    the final layer norm unless ``final_norm=False``. ``pad_id`` None pads with the end token.
    """

    def __init__(self, tokenizer, model=None, *, pad_id: int | None = None, backtrack: int = 20,
                 emphasis: str = "Original", embeddings: dict | None = None, skip: int = 1,
                 final_norm: bool = True):
        self.tokenizer, self.model = tokenizer, model
        self.start_id, self.end_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_id = self.end_id if pad_id is None else pad_id
        self.comma_id = tokenizer.convert_tokens_to_ids(",</w>")
        self.backtrack, self.emphasis, self.skip, self.final_norm = backtrack, emphasis, skip, final_norm
        self.names = [(self._ids(name), rows) for name, rows in (embeddings or {}).items()]
        self.first_pooled = None

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]

    def _embedding_at(self, ids: list[int], at: int):
        best = None
        for name_ids, rows in self.names:
            if ids[at:at + len(name_ids)] == name_ids and (best is None or len(name_ids) > len(best[0])):
                best = (name_ids, rows)
        return best

    def piece_items(self, text: str, weight: float) -> list[_Item]:
        """One attention piece (not a break) as its tokens and embeddings."""
        items, ids, at = [], self._ids(text), 0
        while at < len(ids):
            found = self._embedding_at(ids, at)
            if found is None:
                items.append(_Item("token", ids[at], weight))
                at += 1
            else:
                items.append(_Item("vectors", ids[at], weight, found[1]))
                at += len(found[0])
        return items

    def items(self, prompt: str) -> list[_Item]:
        """The prompt as a flat stream of tokens, embeddings and breaks."""
        stream = []
        for text, weight in oracle_attention(prompt):
            if (text, weight) == BREAK_MARK:
                stream.append(_Item("break"))
            else:
                stream += self.piece_items(text, weight)
        return stream

    def _seal(self, body: list, weights: list, vectors: list) -> OracleChunk:
        filler = CHUNK_TOKENS - len(body)
        return OracleChunk([self.start_id, *body, *[self.end_id] * filler, self.end_id],
                           [1.0, *weights, *[1.0] * filler, 1.0], vectors)

    def chunks(self, prompt: str) -> list[OracleChunk]:
        done: list[OracleChunk] = []
        body, weights, vectors, comma = [], [], [], None

        def seal():
            nonlocal body, weights, vectors, comma
            done.append(self._seal(body, weights, vectors))
            body, weights, vectors, comma = [], [], [], None

        for item in self.items(prompt):
            if item.kind == "break":
                seal()
                continue
            if item.first_id == self.comma_id:
                comma = len(body)
            elif (self.backtrack and len(body) == CHUNK_TOKENS and comma is not None
                  and CHUNK_TOKENS - comma <= self.backtrack):
                moved = (body[comma + 1:], weights[comma + 1:])
                body, weights = body[:comma + 1], weights[:comma + 1]
                seal()
                body, weights = list(moved[0]), list(moved[1])
            if len(body) == CHUNK_TOKENS:
                seal()
            if item.kind == "token":
                body.append(item.first_id)
                weights.append(item.weight)
                continue
            count = item.rows.shape[0]
            if len(body) + count > CHUNK_TOKENS:
                seal()
            vectors.append((len(body), item.rows))
            body += [0] * count
            weights += [item.weight] * count
        if body or not done:
            seal()
        return done

    def window_ids(self, chunk: OracleChunk) -> list[int]:
        """The ids the model sees: after the first end token, ``pad_id``."""
        cut = chunk.ids.index(self.end_id) + 1
        return chunk.ids[:cut] + [self.pad_id] * (len(chunk.ids) - cut)

    def _blank(self) -> OracleChunk:
        return self._seal([], [], [])

    def encode(self, texts: list[str]) -> torch.Tensor:
        """``[batch, 77 * chunks, width]``; shorter texts get blank chunks."""
        per_text = [self.chunks(text) for text in texts]
        parts = []
        for index in range(max(len(c) for c in per_text)):
            row = [c[index] if index < len(c) else self._blank() for c in per_text]
            hidden, pooled = self._run(row)
            if index == 0:
                self.first_pooled = pooled
            parts.append(self._emphasize(hidden, torch.tensor([c.weights for c in row])))
        return torch.cat(parts, dim=1)

    def _emphasize(self, hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.emphasis == "Ignore":
            return hidden
        scaled = hidden * weights.unsqueeze(-1)
        if self.emphasis == "No norm":
            return scaled
        return scaled * (hidden.mean() / scaled.mean())

    def _run(self, row: list[OracleChunk]):
        ids = torch.tensor([self.window_ids(c) for c in row])

        def put_vectors(module, inputs, embedded):
            embedded = embedded.clone()
            for b, chunk in enumerate(row):
                for slot, rows in chunk.vectors:
                    n = min(WINDOW_TOKENS - slot - 1, rows.shape[0])
                    embedded[b, slot + 1:slot + 1 + n] = rows[:n].to(embedded.dtype)
            return embedded

        text_model = self.model.text_model
        handle = text_model.embeddings.token_embedding.register_forward_hook(put_vectors)
        try:
            with torch.no_grad():
                out = self.model(input_ids=ids, output_hidden_states=True)
                if self.skip == 1:
                    hidden = out.last_hidden_state
                else:
                    hidden = out.hidden_states[-self.skip]
                    hidden = text_model.final_layer_norm(hidden) if self.final_norm else hidden
        finally:
            handle.remove()
        return hidden, getattr(out, "text_embeds", None)


__all__ = ["oracle_attention", "oracle_schedule", "oracle_and_parts", "active_entry",
           "OracleClip", "OracleChunk", "CHUNK_TOKENS"]


def a1111_embedding_folder(folder, seed: int) -> tuple:
    """``(folder, {name: vectors})``: a textual-inversion folder for the A1111 tests, with
    ``myemb`` (3 vectors) and ``style two`` (2 vectors, a two-token name), 768 wide."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    vectors = {"myemb": torch.randn(3, 768, generator=generator),
               "style two": torch.randn(2, 768, generator=generator)}
    for name, value in vectors.items():
        save_file({"emb_params": value}, str(folder / f"{name}.safetensors"))
    return folder, vectors
