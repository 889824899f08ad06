"""`rillm generate` as a user runs it: a real process, output streamed to stdout."""

from __future__ import annotations

import subprocess
import sys

RILLM = [sys.executable, "-m", "rillm.cli"]


def test_generate_streams_an_answer():
    result = subprocess.run(
        [*RILLM, "generate", "What is the capital of France?", "--temperature", "0",
         "--max-tokens", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_bad_arguments_give_one_clear_line_not_a_traceback(tmp_path):
    for args, expected in [
        (["--model", str(tmp_path / "missing.gguf")], "does not exist"),
        (["--temperature", "-1"], "temperature"),
    ]:
        result = subprocess.run([*RILLM, "generate", "hi", *args], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2
        assert expected in result.stderr and "Traceback" not in result.stderr


def test_a_mistyped_chat_template_path_is_an_error_not_a_template(tmp_path):
    result = subprocess.run([*RILLM, "serve", "--chat-template", str(tmp_path / "chat.jinja")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_ready_in_counts_from_the_process_start():
    # The serve line's clock starts when the process did, so it includes the interpreter's
    # start and the imports: here a half-second sleep before the clock is even asked.
    code = ("import time; time.sleep(0.5); from rillm.cli import process_started; "
            "print(time.monotonic() - process_started())")
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=60, check=True).stdout)
    assert 0.5 <= age < 30


def test_step_sizes_default_by_device_and_stay_when_given():
    """`rillm serve --device cuda` steps wider than the CPU (vLLM's GPU defaults); a flag given
    is kept, a bad one still refused by the engine's config."""
    import pytest

    from rillm.cli import build_parser, engine_config

    def config(*argv):
        return engine_config(build_parser().parse_args(["serve", *argv]))

    cpu, cuda = config(), config("--device", "cuda")
    assert (cpu.max_num_seqs, cpu.max_num_batched_tokens) == (64, 1024)
    assert (cuda.max_num_seqs, cuda.max_num_batched_tokens) == (256, 8192)
    given = config("--device", "cuda:1", "--max-num-seqs", "8", "--max-num-batched-tokens", "512")
    assert (given.max_num_seqs, given.max_num_batched_tokens) == (8, 512)
    with pytest.raises(ValueError, match="max_num_seqs"):
        config("--max-num-seqs", "0")
