"""The torch-free family table the entry points read (textenc.text_encoders.names) equals the
registry, and the command line and node menus take their choices from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from textenc.text_encoders import families, names

ROOT = Path(__file__).resolve().parents[1]


def test_names_equal_the_registry():
    assert names.CLIP_TYPES == families.family_names()
    assert names.ROLES == {family.name: family.role_names for family in families.families()}
    assert names.families_with_parts(3) == ("sd3",)


def test_entry_points_take_every_family():
    from textenc.cli import build_parser
    from textenc.commands import encode
    assert encode.CLIP_TYPES == ("auto", *families.family_names())
    parser = build_parser(["encode"])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for command in ("encode", "inspect"):
        option = next(a for a in sub[command]._actions if "--clip-type" in a.option_strings)
        assert tuple(option.choices) == ("auto", *families.family_names()), command
        assert option.help.startswith(names.CLIP_TYPE_HELP), command


def test_reading_the_names_imports_no_torch():
    code = ("import sys; import textenc.text_encoders.names, textenc.commands.parser; "
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
