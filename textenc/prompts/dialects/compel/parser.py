"""compel's prompt syntax read by recursive descent: a string → a parse tree.

A hand-written reading of the pyparsing grammar of compel 2.5.1
(``compel/prompt_parser.py``), kept to the same results, quirks included: what
matches where, how quoted text is unescaped and re-read, which text stays
literal. :mod:`.grammar` turns the tree into weighted fragments. Facts
from compel's source; the code is textenc's.
"""

from __future__ import annotations

import bisect
import re
import string
from dataclasses import dataclass
from typing import Callable, Optional

from ....errors import PromptError

__all__ = ["Parser", "Text", "Attention", "Nodes", "unescape"]

SYNTACTIC = '()",.+-='
PYPARSING_WHITE = " \t\n\r"     # what pyparsing skips between elements
WORD_BREAK = string.whitespace + SYNTACTIC
PLUS_BASE, MINUS_BASE = 1.1, 0.9  # compel's attention_plus_base / attention_minus_base
_REAL = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)")  # pyparsing_common.real
_INTEGER = re.compile(r"-?[0-9]+")
_QUOTED = re.compile(r'"(?:(?:\\")|(?:[^"\n\r]))*"')
_UNQUOTE = re.compile(r"(\\t|\\n|\\f|\\r)|(\\[0-7]{3}|\\0|\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4})|(.)")
_WS_ESCAPES = {r"\t": "\t", r"\n": "\n", r"\f": "\f", r"\r": "\r"}
_KEYWORD = re.compile(r"[A-Za-z0-9_\-]+")
_LORA = re.compile(r"(?:useLora|withLora)[ \t\n\r]*\(")
# Runs of words, each followed by pyparsing's white space (or the end), that no rule but
# a word can read (see Parser.plain_words). Inside brackets and quotes, a word has no
# syntax, escape or white space character; in a whole prompt (where any run of non-space
# is text), it has no sign or backslash and does not start with a quote, bracket or dot.
_PLAIN_RUN = re.compile(r'(?:[^ \t\n\r\x0b\x0c()",.+\-=\\]+(?:[ \t\n\r]+|\Z))+')
_FREE_RUN = re.compile(r'(?:[^ \t\n\r\x0b\x0c"(.+\-\\][^ \t\n\r\x0b\x0c+\-\\]*(?:[ \t\n\r]+|\Z))+')
_CLAIMED = re.compile(r"\.attend|\.swap|Lora")  # a free word holding these is left to the rules
_WORD = re.compile(r"[^ \t\n\r]+")


@dataclass
class Text:
    """Literal text (escapes already resolved): ``words`` words compel would parse one
    by one, joined here by single spaces (a run of plain words is one node)."""

    text: str
    words: int = 1


@dataclass
class Attention:
    """A weight applied to its children (``(x)1.3``, ``x+``, ``x.attend(0.8)``)."""

    weight: float
    children: list


Nodes = list  # of Text | Attention
Result = Optional[tuple[Nodes, int]]


def unescape(text: str) -> str:
    """compel's Fragment(): ``\\(``, ``\\)``, ``\\"`` become literal (applied on every rebuild)."""
    if '\\"' in text or "\\(" in text or "\\)" in text:
        text = text.replace("\\(", "(").replace("\\)", ")").replace('\\"', '"')
    return text


class Parser:
    """Recursive descent over one string; every method returns ``(nodes, end)`` or None."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)
        self._memo: dict = {}  # (rule, pos) -> result: nested brackets are re-tried often
        self._claimed = [match.start() for match in _CLAIMED.finditer(text)]  # where free runs end

    def memo(self, key: tuple, compute: Callable[[], Result]) -> Result:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def ws(self, pos: int) -> int:
        while pos < self.n and self.s[pos] in PYPARSING_WHITE:
            pos += 1
        return pos

    def literal(self, pos: int, word: str) -> Optional[int]:
        pos = self.ws(pos)
        return pos + len(word) if self.s.startswith(word, pos) else None

    # -- words ----------------------------------------------------------------
    def word(self, pos: int) -> Result:
        """``non_syntax_word``: no whitespace or syntax, save escapes and inner +/-."""
        start = p = self.ws(pos)
        s, n = self.s, self.n
        while p < n:
            c = s[p]
            if c == "\\" and p + 1 < n and s[p + 1] in SYNTACTIC:
                p += 2
            elif c in "+-" and p + 1 < n and s[p + 1] not in PYPARSING_WHITE and s[p + 1] not in SYNTACTIC:
                p += 1
            elif c not in WORD_BREAK:
                p += 1
            else:
                break
        return ([Text(unescape(s[start:p]))], p) if p > start else None

    def free_word(self, pos: int) -> Result:
        start = p = self.ws(pos)
        while p < self.n and self.s[p] not in string.whitespace:
            p += 1
        return ([Text(unescape(self.s[start:p]))], p) if p > start else None

    def number(self, pos: int) -> Optional[tuple[float, int]]:
        pos = self.ws(pos)
        match = _REAL.match(self.s, pos) or _INTEGER.match(self.s, pos)
        return (float(match.group()), match.end()) if match else None

    def weight_operator(self, pos: int, *, numbers: bool = True) -> Optional[tuple[float, int]]:
        pos = self.ws(pos)
        if pos < self.n and self.s[pos] in "+-":
            sign, end = self.s[pos], pos
            while end < self.n and self.s[end] == sign:
                end += 1
            try:
                return pow(PLUS_BASE if sign == "+" else MINUS_BASE, end - pos), end
            except OverflowError:  # a float can't hold it
                raise PromptError(f"{end - pos} '{sign}' signs at character {pos}: the weight "
                                  f"{PLUS_BASE if sign == '+' else MINUS_BASE}**{end - pos} overflows") from None
        return self.number(pos) if numbers else None

    def plain_words(self, pos: int, *, free: bool = False) -> Optional[tuple[Nodes, int]]:
        """A run of words from ``pos`` as one :class:`Text`, or None; ``free``: in a whole
        prompt (:meth:`prompt`), else inside brackets or quotes (:meth:`fragments`).

        What the rules read there, at a fixed cost per run instead of per word. Each
        word is followed by white space, and holds no sign, so no weight applies to it.
        Its first character starts no group, and an operator's target is the word's
        start up to its first syntax character, so no rule but a word matches in it:
        a free word with ``.attend``, ``.swap`` or ``Lora`` in it ends the run before
        it. No next word starts with ``.`` or ``(``, so no ``w .attend(``, ``w .swap(``
        or ``useLora (`` spans two of them: the last word is left to the rules when one
        of those follows it.
        """
        start = self.ws(pos)
        claimed = self.n
        if free:  # scan no further than the next claimed word, so that each character is scanned once
            index = bisect.bisect_left(self._claimed, start)
            claimed = self._claimed[index] if index < len(self._claimed) else self.n
        match = (_FREE_RUN if free else _PLAIN_RUN).match(self.s, start, claimed)
        if match is None:
            return None
        end = match.end()
        if end == claimed < self.n:  # the run reached the claimed word: end it at the word's start
            end = max(self.s.rfind(c, start, claimed) for c in PYPARSING_WHITE) + 1 or start
        words = _WORD.findall(self.s, start, end)
        if words and end < self.n and self.s[end] in ".(":
            end = self.s.rindex(words.pop(), start, end)
        return ([Text(" ".join(words), len(words))], end) if words else None

    # -- groups ---------------------------------------------------------------
    def quoted(self, pos: int, inner: Callable[["Parser", int], Result]) -> Result:
        return self.memo(("quoted", pos, inner.__name__), lambda: self._quoted(pos, inner))

    def _quoted(self, pos: int, inner: Callable[["Parser", int], Result]) -> Result:
        pos = self.ws(pos)
        match = _QUOTED.match(self.s, pos)
        if not match:
            return None
        content = "".join(_WS_ESCAPES[m[1]] if m[1] else _numeric_escape(m[2][1:]) if m[2] else m[3]
                          for m in _UNQUOTE.finditer(match.group()[1:-1]))
        content = content.replace('\\"', '"')
        if not content.strip():
            return [Text("")], match.end()
        sub = Parser(content.replace('"', '\\"').expandtabs())
        result = inner(sub, 0)
        if result is None or sub.ws(result[1]) != sub.n:
            return None
        return result[0], match.end()

    def parenthesized(self, pos: int) -> Result:
        return self.memo(("paren", pos), lambda: self._parenthesized(pos))

    def _parenthesized(self, pos: int) -> Result:
        start = self.literal(pos, "(")
        if start is None:
            return None
        nodes, end = self.fragments(start)
        close = self.literal(end, ")")
        return (nodes, close) if close is not None else None

    def target(self, pos: int) -> Result:
        """An operator's target: quoted, parenthesized, or one bare word."""
        return (self.quoted(pos, Parser.fragments) or self.parenthesized(pos) or self.word(pos))

    def attention(self, pos: int) -> Result:
        return self.memo(("attention", pos), lambda: self._attention(pos))

    def _attention(self, pos: int) -> Result:
        target = self.target(pos)
        if target is not None:  # explicit: target.attend(w)
            p = self.literal(target[1], ".attend")
            p = self.literal(p, "(") if p is not None else None
            op = self.weight_operator(p) if p is not None else None
            close = self.literal(op[1], ")") if op is not None else None
            if close is not None:
                return [Attention(op[0], target[0])], close
        group = self.quoted(pos, Parser.fragments) or self.parenthesized(pos)
        numbers = group is not None
        group = group or self.word(pos)
        if group is None or group[1] >= self.n or self.s[group[1]] in PYPARSING_WHITE:
            return None
        op = self.weight_operator(group[1], numbers=numbers)
        return ([Attention(op[0], group[0])], op[1]) if op is not None else None

    def refused(self, pos: int) -> None:
        """``.swap()`` and LoRA terms: refuse rather than silently drop them."""
        p = self.ws(pos)
        if _LORA.match(self.s, p):
            raise PromptError(f"compel's withLora()/useLora() at {self.s[p:p + 30]!r} is not supported: "
                              "textenc cannot load LoRAs; apply the LoRA to the model and remove the term")
        target = self.target(p)
        if target is not None:
            q = self.literal(target[1], ".swap")
            if q is not None and self.literal(q, "(") is not None:
                raise PromptError(f"compel's .swap() (cross-attention control) at {self.s[p:q]!r} is not "
                                  "supported by textenc; write the prompt without .swap()")

    def fragments(self, pos: int) -> tuple[Nodes, int]:
        """Inside brackets or quotes: syntax, words, and ``,`` / ``.`` as text."""
        nodes: Nodes = []
        while True:
            got = self.plain_words(pos)
            if got is not None:
                nodes += got[0]
                pos = got[1]
            self.refused(pos)
            got = self.attention(pos) or self.parenthesized(pos) or self.quoted(pos, Parser.fragments) \
                or self.word(pos)
            if got is None:
                p = self.ws(pos)
                if p < self.n and self.s[p] in ",.":
                    got = [Text(self.s[p])], p + 1
            if got is None:
                return nodes, pos
            nodes += got[0]
            pos = got[1]

    def prompt(self, pos: int) -> tuple[Nodes, int]:
        """A whole prompt: syntax where it parses, any other run of non-space as text."""
        nodes: Nodes = []
        while True:
            got = self.plain_words(pos, free=True)
            if got is not None:
                nodes += got[0]
                pos = got[1]
            self.refused(pos)
            got = self.attention(pos) or self.quoted(pos, Parser.fragments) or self.parenthesized(pos) \
                or self.free_word(pos)
            if got is None:
                return nodes, self.ws(pos)
            nodes += got[0]
            pos = got[1]

    # -- blend and conjunction -------------------------------------------------
    def operator_call(self, pos: int, operators: tuple[str, ...]):
        """``(t1, t2, ...).op(options)`` → (targets, operator, options, end) or None."""
        p = self.literal(pos, "(")
        if p is None:
            return None
        targets = []
        while True:
            item = self.target(p) or self.quoted(p, Parser.prompt)
            if item is None:
                return None
            targets.append(item[0])
            comma = self.literal(item[1], ",")
            if comma is None:
                break
            p = comma
        p = self.literal(item[1], ")")
        p = self.ws(p) if p is not None else None
        operator = next((op for op in operators if p is not None and self.s.startswith(op, p)), None)
        if operator is None:
            return None
        p = self.literal(p + len(operator), "(")
        options = self.options(p) if p is not None else None
        if options is None:
            return None
        return targets, operator, options[0], options[1]

    def options(self, pos: int) -> Optional[tuple[list[str], int]]:
        values: list[str] = []
        p = pos
        while True:
            option = self.option(p)
            if option is None:
                break
            values.append(option[0])
            p = option[1]
            comma = self.literal(p, ",")
            if comma is None or self.option(comma) is None:
                break
            p = comma
        close = self.literal(p, ")")
        return (values, close) if close is not None else None

    def option(self, pos: int) -> Optional[tuple[str, int]]:
        p = self.ws(pos)
        keyword = _KEYWORD.match(self.s, p)
        equals = self.literal(keyword.end(), "=") if keyword else None
        if equals is not None:  # key=value: compel's float() of it fails; _weights refuses it
            value = self.number(equals) or _KEYWORD.match(self.s, self.ws(equals))
            if value is not None:
                end = value[1] if isinstance(value, tuple) else value.end()
                return f"{keyword.group()}=", end
        number = self.number(p)
        if number is not None:
            return str(number[0]), number[1]
        return (keyword.group(), keyword.end()) if keyword else None


def _numeric_escape(code: str) -> str:
    """pyparsing's reading of ``\\0``, ``\\ooo``, ``\\xHH``, ``\\uHHHH`` inside quotes."""
    if code == "0":
        return "\0"
    if code.isdigit() and len(code) == 3:
        return chr(int(code, 8))
    return chr(int(code[1:], 16))

