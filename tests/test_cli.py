import subprocess
import sys

from llm_embedder.cli import build_parser, main


def test_help_lists_every_command():
    text = build_parser().format_help()
    for command in ("quickstart", "label", "train", "eval", "index", "search", "merge"):
        assert command in text


def test_console_script_answers_help():
    result = subprocess.run([sys.executable, "-m", "llm_embedder.cli", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "quickstart" in result.stdout


def test_bad_input_gives_a_clear_error_and_exit_code_2(tmp_path, capsys):
    code = main(["label", "--task", "qa", "--queries", str(tmp_path / "absent.jsonl"),
                 "--corpus", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path / "o.jsonl"),
                 "--method", "labels"])
    assert code == 2
    assert "absent.jsonl" in capsys.readouterr().err
