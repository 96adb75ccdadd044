"""AUTOMATIC1111's prompt dialect (``syntax="a1111"``), as its own code reads prompts.

* :mod:`.attention`: the attention grammar (``(x)``, ``[x]``, ``(x:w)``,
  escapes, unbalanced brackets, joining of equal weights, ``BREAK``).
* :mod:`.chunks`: 75-token chunks, comma backtracking, embeddings, windows.
* :mod:`.schedule`: prompt editing ``[a:b:when]``, alternation ``[a|b]``, ``AND``.

Encoding a schedule with A1111's emphasis over the batch is model code:
:mod:`textenc.text_encoders.schedules` (this dialect's ``schedule_encoding``)
and :mod:`textenc.text_encoders.weighting.a1111`.

Each module states the rules it follows; they are facts taken from
AUTOMATIC1111's ``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``.
"""

from .attention import parse_attention
from .chunks import DEFAULT_BACKTRACK, tokenize_line
from .dialect import DIALECT, A1111Dialect, chunk_windows
from .schedule import prompt_schedule, split_and

__all__ = ["DIALECT", "A1111Dialect", "parse_attention", "tokenize_line", "chunk_windows",
           "prompt_schedule", "split_and", "DEFAULT_BACKTRACK"]
