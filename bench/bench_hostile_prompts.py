"""Hostile prompt shapes: each finishes or is refused in time linear in its length (issue 27, point 5).

Every shape the last fuzz found slow (long white space runs, a million stray ``)``,
``BREAK`` repeated, many short words, missing ``embedding:name`` with an embedding
folder, huge prompt-editing schedules) is run under every syntax (comfy, a1111,
compel) at 0.25, 0.5 and 1 MB with the tokenizer's default limits: the prompt is
tokenized, then its schedule made (``prompt_schedules``; a1111 reads ``AND``,
editing and alternation, the others give the text as it is). The bound is 2 s of
CPU per MB (process CPU time, which the other users of a shared machine barely
change; the wall time is shown too). A shape passes when every size finishes or is
refused with a PromptError within the bound and the time per MB does not grow with
the size by more than 2x (linear, not quadratic).

Usage: ``python bench/bench_hostile_prompts.py [WORD [SYNTAX]]`` (prints a Markdown table; WORD
keeps the shapes whose name contains it, "" all of them; SYNTAX runs that syntax alone).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from typing import Callable

import torch

from textenc.errors import PromptError
from textenc.prompts.dialects import prompt_schedules
from textenc.prompts.tokenizer import SDTokenizer

MB = 1 << 20
SIZES = (MB // 4, MB // 2, MB)
SYNTAXES = ("comfy", "a1111", "compel")
BOUND_S_PER_MB = 2.0


def _repeat(unit: str, size: int) -> str:
    return (unit * (size // len(unit) + 1))[:size]


def _edits(size: int) -> str:
    parts, total, i = [], 0, 1
    while total < size:
        part = f"[a{i}:b:{i}]"
        parts.append(part)
        total += len(part)
        i += 1
    return "".join(parts)[:size]


#: name -> (text of a given size, steps for its schedule)
SHAPES: dict[str, Callable[[int], tuple[str, int]]] = {
    "white space run `a␣…␣b`": lambda n: ("a" + " " * (n - 2) + "b", 20),
    "AND parts over white space": lambda n: ("a" + " " * (n // 2) + "AND b" + " " * (n // 2 - 8) + ":1", 20),
    "stray `)` × n": lambda n: (")" * n, 20),
    "`BREAK ` × n": lambda n: (_repeat("BREAK ", n), 20),
    "`a ` × n (compel joins)": lambda n: (_repeat("a ", n), 20),
    "missing `embedding:name` × n": lambda n: (_repeat("embedding:missing ", n), 20),
    "`[a|b]` at 3,000,000 steps": lambda n: (_repeat("[a|b] ", n), 3_000_000),
    "1 edit per step `[aK:b:K]`": lambda n: (_edits(n), 1_000_000),
}


def run_one(tokenizer: SDTokenizer, text: str, steps: int, syntax: str) -> tuple[float, float, str]:
    """(cpu s, wall s, outcome) for tokenizing ``text`` and making its schedule."""
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        tokenizer.tokenize_with_weights(text, syntax=syntax)
        prompt_schedules(syntax, text, steps)
        outcome = "ok"
    except PromptError as error:
        outcome = "refused: " + str(error).split(" (", 1)[0][:48]
    return time.process_time() - cpu, time.perf_counter() - wall, outcome


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # missing embeddings warn once per prompt
    folder = tempfile.mkdtemp(prefix="textenc-hostile-")
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(2, 768)}, os.path.join(folder, "present.safetensors"))
    os.utime(folder, ns=(10**18, 10**18))  # settled (2001): misses in a just-changed folder are not kept
    tokenizer = SDTokenizer(embedding_directory=folder)
    print("| shape | syntax | 0.25 MB cpu (wall) s | 0.5 MB | 1 MB | outcome at 1 MB | max s/MB | pass |")
    print("|---|---|---|---|---|---|---|---|")
    failures = 0
    wanted = sys.argv[1] if len(sys.argv) > 1 else ""
    syntaxes = sys.argv[2:3] or SYNTAXES
    for name, make in SHAPES.items():
        if wanted not in name:
            continue
        for syntax in syntaxes:
            cells, per_mb, outcome = [], [], ""
            for size in SIZES:
                text, steps = make(size)
                cpu, wall, outcome = run_one(tokenizer, text, steps, syntax)
                cells.append(f"{cpu:.2f} ({wall:.2f})")
                per_mb.append(cpu / (size / MB))
            ok = max(per_mb) <= BOUND_S_PER_MB and per_mb[-1] <= 2 * max(per_mb[0], 0.05)
            failures += not ok
            print(f"| {name} | {syntax} | {' | '.join(cells)} | {outcome} | {max(per_mb):.2f} | "
                  f"{'PASS' if ok else 'FAIL'} |", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
