"""Every fault of the real entry points ends in one line and a fixed exit status.

``python -m textenc`` and the installed ``textenc`` script run in subprocesses
(with this checkout first on ``PYTHONPATH``): usage errors exit 2 with one
line and a pointer to ``--help``; runtime faults a user can cause exit 1 with
one line naming the path and the fix, and never a traceback; SIGINT / SIGTERM
exit 130 / 143 and leave no file under the output's name.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from textenc.loading.convert import to_layout

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("textenc", path=os.path.dirname(sys.executable))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=1, projection_dim=64, hidden_act="quick_gelu")
    hf = transformers.CLIPTextModelWithProjection._from_config(config)
    path = tmp_path_factory.mktemp("m") / "tiny_sd1.safetensors"
    save_file({k: v.contiguous().clone() for k, v in to_layout(hf.state_dict(), "sd1").items()}, path)
    return path


def _command(entry: str) -> list[str]:
    return [SCRIPT] if entry == "script" else [sys.executable, "-m", "textenc"]


ENTRIES = ["python -m textenc", pytest.param("script", marks=pytest.mark.skipif(
    SCRIPT is None, reason="the textenc script is not installed next to this python"))]


def _run(*args, entry: str = "python -m textenc", cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*_command(entry), *args], cwd=cwd, capture_output=True, env=env,
                          timeout=180, **kwargs)


def _one_line(result: subprocess.CompletedProcess, status: int) -> str:
    err = result.stderr.decode("utf-8", "backslashreplace")
    assert result.returncode == status, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err and "usage:" not in err
    return err


# --- usage errors: 2 ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("args, prog, words", [
    ((), "textenc", "required: COMMAND"),
    (("frobnicate",), "textenc", "invalid choice: 'frobnicate'"),
    (("encode", "a", "--model", "m", "--out", "o.safetensors", "--bogus"), "textenc encode",
     "unrecognized arguments: --bogus"),
    (("encode", "a", "--model", "m.safetensors"), "textenc encode", "required: --out"),
    (("encode", "a", "--model", "m", "--out", "o.safetensors", "--clip-skip", "two"), "textenc encode",
     "argument --clip-skip: invalid int value: 'two'"),
    (("inspect",), "textenc inspect", "required: prompt"),
    (("vision", "a.png", "--model", "m", "--out", "o.safetensors", "--crop", "x"), "textenc vision",
     "invalid choice: 'x'"),
    (("encode-dataset", "in.txt", "--bogus"), "textenc encode-dataset", "required: --model, --out"),
    # the sub-command's own parser answers, with the closest option or choice (issue 28)
    (("encode", "a", "--model", "m", "--out", "o.safetensors", "--clipskip", "2"), "textenc encode",
     "unrecognized arguments: --clipskip 2 (did you mean --clip-skip?)"),
    (("encode", "--clipskip=2", "a", "--model", "m", "--out", "o.safetensors", "--bogus"), "textenc encode",
     "unrecognized arguments: --clipskip=2 --bogus (did you mean --clip-skip for --clipskip?)"),
    (("encode", "a", "--modle", "m", "--out", "o.safetensors"), "textenc encode",
     "required: --model; unrecognized arguments: --modle (did you mean --model?)"),
    (("encode", "a", "--model", "m", "--out", "o.safetensors", "--syntax", "compl"), "textenc encode",
     "invalid choice: 'compl' (choose from 'comfy', 'a1111', 'compel'; did you mean 'compel'?)"),
    (("encode", "--model", "m", "--out", "o.safetensors"), "textenc encode", "no prompts"),
    (("inspect", "a", "--tokeniser", "sd2"), "textenc inspect", "(did you mean --tokenizer?)"),
    (("encdoe", "a"), "textenc", "did you mean 'encode'?"),
    (("encode-dataset", "in.txt", "--model", "m", "--out", "o", "--shard-rws", "2"), "textenc encode-dataset",
     "unrecognized arguments: --shard-rws 2 (did you mean --shard-rows?)"),
])
def test_usage_errors_are_one_line_and_exit_2(tmp_path, entry, args, prog, words):
    err = _one_line(_run(*args, entry=entry, cwd=tmp_path), 2)
    assert err.startswith(f"{prog}: error: ") and words in err
    assert err.rstrip().endswith(f"see '{prog} --help'")


# --- runtime errors: 1 ----------------------------------------------------------------

@pytest.mark.slow
def test_out_is_checked_before_the_model_loads(tmp_path):
    """The model path does not exist: the error about --out proves it came first."""
    missing = str(tmp_path / "no-model.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    cases = {str(tmp_path): "is a folder", str(tmp_path / "folder.safetensors"): "is a folder",
             "/proc/x.safetensors": "cannot write in folder /proc",
             str(tmp_path / "no" / "o.safetensors"): "does not exist; create it first",
             str(tmp_path / "o.txt"): "name it *.safetensors"}
    for out, words in cases.items():
        err = _one_line(_run("encode", "a", "--model", missing, "--out", out, cwd=tmp_path), 1)
        assert err.startswith(f"textenc: error: --out {out}") and words in err, err
    err = _one_line(_run("vision", str(tmp_path / "a.png"), "--model", missing, "--out", str(tmp_path),
                         cwd=tmp_path), 1)
    assert "--out" in err and "is a folder" in err


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRIES)
def test_non_utf8_prompts_file_and_missing_files(model, tmp_path, entry):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a photo of a caf\xe9\n")  # Latin-1, not UTF-8
    out = str(tmp_path / "o.safetensors")
    err = _one_line(_run("encode", "--prompts-file", str(prompts), "--model", str(model), "--out", out,
                         entry=entry, cwd=tmp_path), 1)
    assert f"{prompts}: not UTF-8 text (byte 0xe9" in err and "save the prompts file as UTF-8" in err
    err = _one_line(_run("encode", "--prompts-file", str(tmp_path / "none.txt"), "--model", str(model),
                         "--out", out, entry=entry, cwd=tmp_path), 1)
    assert f"{tmp_path / 'none.txt'}: no such file or folder" in err
    err = _one_line(_run("encode", "--prompts-file", str(tmp_path), "--model", str(model),
                         "--out", out, entry=entry, cwd=tmp_path), 1)
    assert f"{tmp_path}: it is a folder: give a file path" in err
    assert not os.path.exists(out)


@pytest.mark.slow
def test_model_under_a_non_utf8_path_is_a_path_problem(model, tmp_path):
    folder = os.fsencode(tmp_path) + b"/mod\xe8les"
    os.mkdir(folder)
    shutil.copy(model, folder + b"/tiny.safetensors")
    err = _one_line(_run("encode", "a", "--model", folder + b"/tiny.safetensors", "--out",
                         str(tmp_path / "o.safetensors"), cwd=tmp_path), 1)
    assert "mod\\xe8les/tiny.safetensors: the path is not valid UTF-8" in err
    assert "corrupt" not in err and "rename" in err


@pytest.mark.slow
@pytest.mark.parametrize("command", ["encode", "inspect"])
def test_embeddings_must_be_an_existing_folder(model, tmp_path, command):
    args = ["a", "--model", str(model), "--out", str(tmp_path / "o.safetensors")] if command == "encode" else ["a"]
    err = _one_line(_run(command, *args, "--embeddings", str(tmp_path / "nope"), cwd=tmp_path), 1)
    assert f"--embeddings {tmp_path / 'nope'}: the folder does not exist" in err
    (tmp_path / "style.pt").write_bytes(b"")
    err = _one_line(_run(command, *args, "--embeddings", str(tmp_path / "style.pt"), cwd=tmp_path), 1)
    assert "not a folder" in err


@pytest.mark.slow
def test_file_size_limit_names_the_output_and_leaves_nothing(model, tmp_path):
    limit = 4096  # the output (cond 77 x 64 floats) is ~20 KB

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "o.safetensors"
    result = _run("encode", "a cat", "--model", str(model), "--out", str(out), cwd=tmp_path,
                  preexec_fn=small_files)
    err = _one_line(result, 1)
    assert f"{out}: the file exceeds the file-size limit" in err
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_a_file_that_is_no_image(model, tmp_path):
    (tmp_path / "a.png").write_text("not a png")
    err = _one_line(_run("vision", str(tmp_path / "a.png"), "--model", str(model), "--out",
                         str(tmp_path / "v.safetensors"), cwd=tmp_path), 1)
    # the image is checked before the model loads (issue 28); a text encoder as --model comes after
    assert "a.png: not an image Pillow can read" in err


# --- interruption: 130 / 143 -----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum, status, words", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                                    (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_interrupted_encode_exits_130_or_143_and_writes_nothing(model, tmp_path, signum, status, words):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"prompt number {i}, a (red:1.1) fox\n" for i in range(20000)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "textenc", "encode", "--prompts-file", str(prompts),
                                    "--model", str(model), "--out", str(out_dir / "o.safetensors"), "--progress"],
                                   cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        # --progress: the bar ("encode: 0%|...") shows encoding has begun; without it a fast
        # machine finished all 20,000 prompts before the 120 s wait ran out (exit 0).
        deadline = time.monotonic() + 120
        while b"encode:" not in log.read_bytes() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        time.sleep(0.5)
        process.send_signal(signum)
        assert process.wait(timeout=60) == status
    err = log.read_text("utf-8", "backslashreplace")
    assert err.rstrip().splitlines()[-1] == f"textenc: {words}"
    assert "Traceback" not in err
    assert os.listdir(out_dir) == []


@pytest.mark.slow
def test_a_reader_that_leaves_early_is_no_error_message(tmp_path):
    """``textenc inspect ... --json | head -c 10``: output larger than a pipe buffer, the
    reader closes; exit 1 and nothing on stderr (no BrokenPipeError traceback)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "textenc", "inspect", "a cat " * 1000, "--json"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(10) == b'{\n "window'
    process.stdout.close()
    assert process.wait(timeout=120) == 1
    assert process.stderr.read() == b""


@pytest.mark.parametrize("code, words", [
    (28, "the disk is full: free some space or write elsewhere"),        # ENOSPC
    (13, "permission denied: check the permissions or choose another location"),  # EACCES
    (30, "the file system is read-only: write elsewhere"),                # EROFS
    (27, "the file exceeds the file-size limit (ulimit -f): raise it or write elsewhere"),  # EFBIG
])
def test_os_errors_name_the_path_and_the_fix(code, words):
    import errno

    from textenc.commands.common import describe_error

    assert errno.errorcode[code] in ("ENOSPC", "EACCES", "EROFS", "EFBIG")
    error = OSError(code, os.strerror(code), os.fsdecode(b"/data/out\xff.safetensors"))
    assert describe_error(error) == f"/data/out\\xff.safetensors: {words}"


def test_parsing_the_command_line_imports_no_torch(tmp_path):
    code = ("import sys; from textenc.cli import build_parser; "
            "build_parser(['encode']).parse_args(['encode', 'a', '--model', 'm', '--out', 'o.safetensors']); "
            "sys.exit('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr


# --- embedding:name that cannot be used, one vocabulary (issue 28) -----------------------

def test_a_missing_embedding_warns_or_ends_the_command(model, tmp_path):
    (tmp_path / "emb").mkdir()
    args = ["embedding:nope a cat", "--model", str(model)]
    result = _run("encode", *args, "--out", str(tmp_path / "a.safetensors"), cwd=tmp_path)
    assert result.returncode == 0 and b"textenc: warning: embedding:nope read as text" in result.stderr
    for extra, words in (((), "embedding:nope read as text: no embedding directory was given"),
                         (("--embeddings", str(tmp_path / "emb")), "embedding:nope skipped (missing: no embedding")):
        out = tmp_path / "b.safetensors"
        err = _one_line(_run("encode", *args, *extra, "--on-missing-embedding", "error", "--out", str(out),
                             cwd=tmp_path), 1)
        assert err.startswith(f"textenc: error: {words}") and "--on-missing-embedding error" in err, err
        assert not out.exists()
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\nembedding:nope a dog\n")
    err = _one_line(_run("encode-dataset", str(captions), "--model", str(model), "--out", str(tmp_path / "ds"),
                         "--embeddings", str(tmp_path / "emb"), "--on-missing-embedding", "error", cwd=tmp_path), 1)
    assert err.startswith("textenc: error: embedding:nope skipped (missing"), err


def test_encode_and_encode_dataset_share_option_names(model, tmp_path, capsys):
    """--clip-type in both, --kind (encode-dataset's old name) in both as a hidden alias;
    --embeddings and --normalization in both. In process: option parsing is what is tested
    here (the subprocess tests around it cover exit codes and streams)."""
    from textenc.cli import main

    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na (dog:1.2)\n")
    for option in ("--clip-type", "--kind"):
        assert main(["encode", "a cat", "--model", str(model), option, "sd1", "--normalization", "mean",
                     "--out", str(tmp_path / f"{option}.safetensors")]) == 0
        assert main(["encode-dataset", str(captions), "--model", str(model), option, "sd1", "--normalization",
                     "mean", "--embeddings", str(tmp_path), "--out", str(tmp_path / option)]) == 0
        assert (tmp_path / f"{option}.safetensors").is_file() and (tmp_path / option).is_dir()
    capsys.readouterr()
    for command in ("encode", "encode-dataset"):
        assert main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--clip-type" in text and "--kind" not in text and "--on-missing-embedding" in text
        assert "encoded as plain text" in text


# --- output hygiene (issue 28) -----------------------------------------------------------

def test_progress_bars_only_on_a_terminal_or_when_asked(model, tmp_path):
    args = ["encode", "a cat", "a dog", "--model", str(model)]
    quiet = _run(*args, "--out", str(tmp_path / "a.safetensors"), cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == b""  # stderr is a pipe here: no bar
    asked = _run(*args, "--progress", "--out", str(tmp_path / "b.safetensors"), cwd=tmp_path)
    assert asked.returncode == 0 and b"encode: 100%" in asked.stderr


def test_messages_name_the_command_line_option(model, tmp_path):
    prompt = "a photo of (http://example.com:8080)"  # the colon reads as a weight of 8080
    result = _run("encode", prompt, "--model", str(model), "--out", str(tmp_path / "a.safetensors"), cwd=tmp_path)
    err = result.stderr.decode()
    assert result.returncode == 0 and "pass --max-weight W to refuse them" in err and "max_weight" not in err
    err = _one_line(_run("encode", prompt, "--model", str(model), "--max-weight", "100",
                         "--out", str(tmp_path / "b.safetensors"), cwd=tmp_path), 1)
    assert "exceeds --max-weight 100" in err and "max_weight" not in err, err


def test_pillow_is_the_vision_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["vision"] == ["pillow"]
    assert "textenc[vision]" in (ROOT / "docs" / "command-line.md").read_text()


def test_ray_logs_only_when_verbose():
    """--verbose sets textenc's logger to INFO; Ray is started at that level, else at ERROR."""
    import logging

    from textenc.dataset.engines import ray as ray_engine

    logger = logging.getLogger("textenc")
    before = logger.level
    assert ray_engine._ray_log_level() == logging.ERROR
    try:
        logger.setLevel(logging.INFO)
        assert ray_engine._ray_log_level() == logging.INFO
    finally:
        logger.setLevel(before)
