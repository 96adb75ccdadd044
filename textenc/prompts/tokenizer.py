"""``SDTokenizer``: ComfyUI's prompt tokenizer, which hands each prompt to its dialect.

``SDTokenizer`` keeps ComfyUI's name, constructor and methods
(``tokenize_with_weights(text, return_word_ids, ...)``, ``untokenize``,
``state_dict``) and adds :meth:`SDTokenizer.inspect`. Its vocabulary, window
shape, embeddings and limits are those of its base,
:class:`~textenc.prompts.vocabulary.Vocabulary`; how a prompt is read is the
dialect's, picked per call by ``syntax=`` (:mod:`textenc.prompts.dialects`):
ComfyUI's own reading, the default, is :mod:`textenc.prompts.dialects.comfy`
(with its deliberate differences from ComfyUI). For a dialect that does not
apply the tokenizer's limits itself while parsing, they are checked here on
its input and windows (:mod:`textenc.prompts.limits`).
"""

from __future__ import annotations

from typing import Any, Sequence

# The dialect modules are loaded here, up front, so that tokenizing never imports a module mid-call.
from textenc.prompts.dialects import a1111, comfy, compel  # noqa: F401
from textenc.prompts.dialects import Dialect, check_refinements, dialect_options, get_dialect
from textenc.prompts.limits import check_prompt_size, check_windows
from textenc.prompts.report import InspectReport, TokenReport, UnitReport
from textenc.prompts.vocabulary import DEFAULT_VOCAB, Vocabulary
from textenc.errors import PromptError

__all__ = ["SDTokenizer", "InspectReport", "UnitReport", "TokenReport", "DEFAULT_VOCAB"]


def _checked_dialect(tokenizer: "SDTokenizer", kwargs: dict) -> Dialect:
    """The dialect of ``kwargs.pop("syntax")``, after refusing another dialect's option
    or refinement (e.g. ``truncate_long_prompts=False`` without ``syntax="compel"``,
    ``square_brackets=True`` with ``syntax="a1111"``) and a syntax the tokenizer's
    model has no definition in (:attr:`SDTokenizer.syntaxes`)."""
    syntax = kwargs.pop("syntax", None)
    dialect_options(syntax, kwargs)
    check_refinements(syntax, kwargs)
    dialect = get_dialect(syntax)
    if tokenizer.syntaxes is not None and dialect.name not in tokenizer.syntaxes:
        applies = ", ".join(repr(name) for name in tokenizer.syntaxes)
        raise PromptError(f"syntax={dialect.name!r} is not defined for {tokenizer.syntax_scope}; "
                          f"the syntaxes that apply: {applies}")
    return dialect


class SDTokenizer(Vocabulary):
    """ComfyUI's ``SDTokenizer``; positional parameters keep ComfyUI's order.

    Args:
        tokenizer_path: folder with ``vocab.json`` + ``merges.txt`` or with
            ``tokenizer.json``; default the bundled CLIP vocabulary.
        max_length: window length (77).
        pad_with_end: pad with the end token (SD1) or with 0 (SD2, SDXL-G).
        embedding_directory: folder or folders of textual inversions.
        embedding_size: embedding width (768, 1024, 1280).
        embedding_key: key for multi-encoder embedding files and tokenizer_data.
        tokenizer_class: a transformers tokenizer class to use instead of the
            Rust backend (slower; ComfyUI's way).
        weight_convention, square_brackets, break_keyword, max_weight,
            max_prompt_chars, strict_weights, warn_weight_above: prompt
            syntax and weight policy, see :mod:`textenc.prompts.parser`.
        max_windows: most windows a prompt may need (default 256, about
            19,000 tokens); checked while tokenizing, before anything is
            encoded; None disables it. Also a per-call keyword.
        cache_size: number of tokenized units remembered.
        embedding_any_width: keep textual inversions of any width in the tokens, as
            ComfyUI's ``load_embed`` does; the encoder then drops those of the wrong width
            and pads the end (T5 tokenizers). Default: a file of another width is skipped
            with an ``EmbeddingWarning`` (README, "Deliberate differences from ComfyUI").

    >>> tok = SDTokenizer()
    >>> [t for t, _ in tok.tokenize_with_weights("a cat")[0][:4]]
    [49406, 320, 2368, 49407]
    """

    #: The prompt syntaxes defined for this tokenizer's model (None: every one); another is
    #: a PromptError naming ``syntax_scope`` (T5: A1111 and compel define no T5 reading here).
    syntaxes: tuple[str, ...] | None = None
    syntax_scope: str = "this text encoder"

    def tokenize_with_weights(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> list[list[tuple]]:
        """Windows of ``(token, weight)`` or ``(token, weight, word_id)``.

        ``syntax=`` picks the prompt dialect (``"comfy"`` default, ``"a1111"``,
        ``"compel"``; see :mod:`textenc.prompts.dialects`); the rest is ComfyUI's, plus the
        dialect's own options (``truncate_long_prompts`` for compel, default True).

        Raises:
            PromptError: unknown syntax, another dialect's option at a value other
                than its default, or what the dialect refuses.
        """
        dialect = _checked_dialect(self, kwargs)
        if dialect.applies_limits:
            return dialect.tokenize_with_weights(self, text, return_word_ids, **kwargs)
        options = self.parse_options_for(kwargs)
        check_prompt_size(text, options, dialect.name)
        windows = dialect.tokenize_with_weights(self, text, return_word_ids, **kwargs)
        check_windows(self, windows, options, self.max_windows_for(kwargs), dialect.name)
        return windows

    def untokenize(self, token_weight_pair: Sequence[tuple]) -> list[tuple[tuple, str]]:
        """Pair each ``(token, weight[, id])`` with its vocabulary text, as ComfyUI.

        >>> SDTokenizer().untokenize([(2368, 1.2)])
        [((2368, 1.2), 'cat</w>')]
        """
        return [(pair, self.token_text(pair[0])) for pair in token_weight_pair]

    def inspect(self, text: str, **kwargs: Any) -> InspectReport:
        """Tokenize ``text`` and report windows, units and embeddings, for debugging prompts.

        ``syntax=`` picks the prompt dialect, as in :meth:`tokenize_with_weights`.
        """
        dialect = _checked_dialect(self, kwargs)
        if dialect.applies_limits:
            return dialect.inspect(self, text, **kwargs)
        options = self.parse_options_for(kwargs)
        check_prompt_size(text, options, dialect.name)
        report = dialect.inspect(self, text, **kwargs)
        pairs = [[(t.token if t.token is not None else t.text, t.weight) for t in window]
                 for window in report.windows]
        check_windows(self, pairs, options, self.max_windows_for(kwargs), dialect.name)
        return report

    def state_dict(self) -> dict:
        """Nothing to save (ComfyUI API)."""
        return {}

