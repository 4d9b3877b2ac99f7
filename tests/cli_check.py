"""The CLI as the error tests see it: run a command in-process, and the shape every deliberate
error must have (exit code 1, one line starting ``error: ``, no traceback)."""

from click.testing import CliRunner

from edgediff.runtime.cli import main


def run_cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *needles: str) -> str:
    """The error line, after checking its shape and that it names every one of ``needles``."""
    assert code == 1, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
