"""Writes tests/a1111_text_expected.json: A1111's token ids for unusual text.

AUTOMATIC1111 pins ``transformers==4.30.2`` and ``open-clip-torch==2.20.0``, and
open-clip-torch installs ``ftfy``. So its tokenizers clean text with ftfy before BPE:

* SD1 and SDXL's CLIP-L: transformers' slow ``CLIPTokenizer`` (loaded with
  ``from_pretrained``, as ldm/sgm do), called as A1111's ``sd_hijack_clip`` calls it:
  ``tokenizer(texts, truncation=False, add_special_tokens=False)``.
* SD2 and SDXL's OpenCLIP-G: open_clip's ``SimpleTokenizer`` (``tokenizer.encode``),
  as A1111's ``sd_hijack_open_clip`` calls it.

This script runs only in an environment of its own (it cannot be installed beside the
project's current transformers), so the expectations are committed as data and
``tests/test_a1111_text.py`` reads them. They come from those tokenizers, never from
textenc. To regenerate:

    python3 -m venv /tmp/oracle-a1111
    /tmp/oracle-a1111/bin/pip install transformers==4.30.2 ftfy
    /tmp/oracle-a1111/bin/pip install --no-deps open-clip-torch==2.20.0
    /tmp/oracle-a1111/bin/python tests/a1111_text_oracle.py

(torch is not needed: open_clip's tokenizer module is loaded from its file with a stub
``torch``, which only its ``tokenize()`` helper uses.) Both tokenizers are built on the
project's bundled vocabulary (textenc/vocab); open_clip's own vocabulary file is checked
to hold the same ids first.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = os.path.join(os.path.dirname(HERE), "textenc", "vocab")
OUTPUT = os.path.join(HERE, "a1111_text_expected.json")

CASES = [
    # plain ASCII and white space
    "a cat", "masterpiece, best quality, 1girl", "A CAT Sitting", "don't it's we're", "a  cat\t\ton\nthe\r\nmat",
    "  padded  ", "", " ", "x" * 40, "a\rb", "a\x0bb", "a\x0cb",
    # curly, full-width and other quotes
    "\u201ccat\u201d", "\u2018cat\u2019", "l\u2019amour", "\uff02cat\uff02", "\uff07cat\uff07", "\u00abcat\u00bb",
    "\u201ea cat\u201c", "\u2039cat\u203a", "\u300ccat\u300d", "it\u2019s a \u201cgood\u201d cat",
    # full-width letters, digits and punctuation
    "\uff46\uff55\uff4c\uff4c", "\uff21\uff22\uff23", "\uff11\uff12\uff13", "\uff43\uff41\uff54\uff0c\u3000\uff44\uff4f\uff47",
    "\uff08\uff43\uff41\uff54\uff1a\uff11\uff0e\uff12\uff09", "\uff01\uff1f", "\uff76\uff80\uff76\uff85",
    # ligatures and compatibility characters
    "\ufb01sh", "\ufb02ower", "\ufb00ect", "\ufb03ce", "\u0132", "\u01c4", "x\u00b2", "\u00bd cup", "\u2460",
    "\u216b", "\U0001d401\U0001d428\U0001d425\U0001d41d", "\u2122 \u00ae \u00a9", "\u2026", "\u2014 \u2013 \u2212",
    # combining marks and accents
    "cafe\u0301", "a\u0308", "n\u0303o", "caf\u00e9 na\u00efve", "\u00c5ngstr\u00f6m", "stra\u00dfe", "\u0130stanbul",
    "\u039f\u0394\u039f\u03a3", "\u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2", "Z\u0351\u036b\u0343a\u0310\u0302l\u0352g\u0357o",
    "\u1e9e", "\u0041\u030a", "\u212b", "\u2126",
    # HTML entities
    "&amp;", "cats &amp; dogs", "&lt;cat&gt;", "&quot;cat&quot;", "&#39;s", "&#x27;a&#x27;", "&nbsp;x", "&amp;lt;",
    "AT&T", "&copy; 2024", "&hellip;", "<b>&amp;</b>", "a & b", "&", "&amp", "&#12354;", "a &lt; b &amp; c",
    # control characters, escapes and invisible characters
    "a\x07b", "a\x00b", "a\x1bb", "\x1b[31mred\x1b[0m", "a\x7fb", "a\x85b", "a\x9db", "\x93cat\x94", "a\u200bb",
    "a\u200db", "\ufeffcat", "soft\u00adhyphen", "a\u2028b", "a\u2029b", "a\u2060b", "a\ufffcb", "a\ufffdb",
    "a\u206ab", "a\x01\x02\x03b",
    # non-breaking, ideographic and other spaces
    "a\u00a0cat", "a\u3000cat", "a\u2009cat", "a\u202fcat", "a\u2002\u2003cat", "\u00a0\u00a0cat\u00a0", "a\u1680b",
    # CJK, other scripts and emoji
    "\u732b", "\u4e00\u53ea\u732b", "\u306d\u3053", "\u30cd\u30b3", "\uace0\uc591\uc774", "\u0642\u0637\u0629",
    "\u0915\u093f\u0924\u093e\u092c", "\u0e41\u0e21\u0e27", "\U0001f431", "\U0001f600 smile", "\U0001f44d\U0001f3fd",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467", "\U0001f1ef\U0001f1f5", "\u2764\ufe0f", "\U0001f431cat\U0001f431",
    # mojibake
    "\u00c3\u00a9", "caf\u00c3\u00a9", "\u00e2\u20ac\u0153cat\u00e2\u20ac\u009d", "\u00c3\u00a0 la", "\u00c3 la",
    "\u00e2\u20ac\u2122", "don\u00e2\u20ac\u2122t", "\u00c3\u00b1o\u00c3\u00b1o", "\u00c2\u00a9", "\u00e6\u2014\u00a5\u00e6\u0153\u00ac",
    "\u00c3\u0192\u00c2\u00a9",
    # special tokens and their look-alikes
    "<|endoftext|>", "a <|startoftext|>b", "!<|endoftext|>", "<|ENDOFTEXT|>", "&amp; <|endoftext|>",
    "&lt;|endoftext|&gt;", "<start_of_text>", "<end_of_text>", "x<end_of_text>", "\uff1c|endoftext|\uff1e",
    # mixed, prompt-like
    "\u201cmasterpiece\u201d, \uff42\uff45\uff53\uff54 quality, \ufb01ne details\u2026",
    "portrait of a woman, caf\u00e9 &amp; bar, \u00a0soft light, \u201ccinematic\u201d",
    "1girl, \u732b\u8033, \U0001f431, l\u2019amour, \u00c3\u00a9t\u00c3\u00a9",
    # pieces of PROMPTS below, as A1111's attention parser cuts them
    ", \uff46\uff55\uff4c\uff4c body, ", " \ufb01sh &amp; chips", ", \u00a0soft light",
]

# Prompts with A1111 syntax whose pieces are all in CASES (tests/test_a1111_text.py).
PROMPTS = [
    "(\u201ccat\u201d:1.2), \uff46\uff55\uff4c\uff4c body, [\u732b]",
    "(\u2018cat\u2019) \ufb01sh &amp; chips",
    "\u201ccat\u201d BREAK \u00c3\u00a9 BREAK ((\U0001f431)), \u00a0soft light",
]

# Random mixes of the pieces above: seeded, so the file is the same on every run.
_ALPHABET = ["a", "b", "cat", "Dog", " ", "  ", ",", ".", "'s", "1", "\t", "\n", "&", "<", ">", "|", "!",
             "\u201c", "\u201d", "\u2019", "\uff02", "\uff43\uff41\uff54", "\uff11", "\ufb01", "\ufb02",
             "\u0301", "\u0308", "&amp;", "&lt;", "&gt;", "&#39;", "&quot;", "&nbsp;", "\x07", "\x00", "\x1b[1m",
             "\x7f", "\x85", "\x93", "\u200b", "\ufeff", "\u00ad", "\u00a0", "\u3000", "\u2009", "\u732b",
             "\u306d", "\uace0", "\U0001f431", "\U0001f44d\U0001f3fd", "\u200d", "\u00e9", "\u00c5", "\u00df",
             "\u0130", "\u03a3", "\u00c3\u00a9", "\u00e2\u20ac\u2122", "\u00c3", "\u00a9", "\u2026", "\u2014",
             "<|endoftext|>", "<end_of_text>"]


def _random_cases(count: int, seed: int = 27) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 12))) for _ in range(count)]


def _hf_tokenizer():
    """transformers 4.30.2's slow CLIPTokenizer on the bundled vocabulary, via from_pretrained (as A1111)."""
    from transformers import CLIPTokenizer

    folder = tempfile.mkdtemp()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(VOCAB, name), folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.fix_text is not None, "ftfy must be installed: A1111's tokenizer runs with it"
    return tokenizer


def _open_clip_tokenizer():
    """open_clip 2.20.0's SimpleTokenizer, loaded from its file with a stub torch."""
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(os.path.dirname(spec.origin), "tokenizer.py")
    stub = types.ModuleType("torch")
    stub.Tensor = stub.LongTensor = object  # only in type hints of the helpers A1111 does not call
    sys.modules.setdefault("torch", stub)
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    tokenizer = module.SimpleTokenizer()
    with open(os.path.join(VOCAB, "vocab.json"), encoding="utf-8") as handle:
        vocab = json.load(handle)
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert {renamed.get(k, k): v for k, v in tokenizer.encoder.items()} == vocab, "open_clip's vocabulary differs"
    return tokenizer


def _ids(encode, text: str):
    try:
        return encode(text)
    except Exception as error:  # A1111 itself fails on this text; the test skips it
        return {"error": type(error).__name__}


def main() -> None:
    hf, open_clip = _hf_tokenizer(), _open_clip_tokenizer()
    texts = CASES + _random_cases(200)
    cases = [{"text": text,
              "clip_l": _ids(lambda t: hf([t], truncation=False, add_special_tokens=False)["input_ids"][0], text),
              "open_clip": _ids(open_clip.encode, text)} for text in texts]
    versions = {name: importlib.metadata.version(name)
                for name in ("transformers", "open-clip-torch", "ftfy", "regex", "tokenizers")}
    data = {"generator": "tests/a1111_text_oracle.py", "python": sys.version.split()[0], "versions": versions,
            "prompts": PROMPTS, "cases": cases}
    header = json.dumps({key: value for key, value in data.items() if key != "cases"})[:-1]
    with open(OUTPUT, "w", encoding="utf-8") as handle:  # one case a line
        handle.write(header + ', "cases": [\n' + ",\n".join(json.dumps(case) for case in cases) + "\n]}\n")
    print(f"{len(cases)} cases -> {OUTPUT}")


if __name__ == "__main__":
    main()
