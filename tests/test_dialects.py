"""The dialect registry: names, default weight modes, and cheap imports for command lines."""

from __future__ import annotations

import subprocess
import sys

import pytest

from textenc.dialects import SYNTAXES, check_syntax, default_weight_mode, get_dialect
from textenc.errors import PromptError


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_the_listed_default_weight_mode_is_the_dialects_own(syntax):
    dialect = get_dialect(syntax)
    assert dialect.name == syntax
    assert default_weight_mode(syntax) == dialect.default_weight_mode


def test_unknown_syntax_names_the_choices():
    with pytest.raises(PromptError, match="unknown prompt syntax 'nai'; choose one of comfy, a1111, compel"):
        check_syntax("nai")
    assert default_weight_mode(None) == "comfy"


def test_listing_the_syntaxes_imports_no_torch():
    code = "import sys; from textenc.dialects import SYNTAXES, default_weight_mode; " \
           "default_weight_mode('a1111'); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_dialects_package_has_no_import_circle():
    """compel's modules (parser → grammar → tokens → weighting → dialect) and A1111's
    import one way only."""
    from import_graph import import_circles, import_graph

    graph = import_graph("textenc.dialects")
    assert {"textenc.dialects.compel_parser", "textenc.dialects.compel_grammar"} <= set(graph)
    assert "textenc.dialects.compel_parser" in graph["textenc.dialects.compel_grammar"]
    assert import_circles("textenc.dialects") == []
