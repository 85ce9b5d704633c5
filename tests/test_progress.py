"""Long stages show they are alive on stderr; --quiet silences it."""

import io
import time

from graphfold.cli.command import Console
from graphfold.progress import SignatureFolded, StageStarted


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run_stage(console, seconds):
    console.progress(StageStarted("fold", "signature 'serve'"))
    time.sleep(seconds)
    console.progress(SignatureFolded("serve", "1 batch norms: 1 folded"))
    console.progress(StageStarted("verify", "1 distinct signature(s) on random inputs"))
    console.print("result table")
    console.done()


def test_plain_lines_while_a_stage_runs_when_stderr_is_not_a_terminal():
    err, out = io.StringIO(), io.StringIO()
    console = Console(out=out, err=err)
    console.heartbeat.every = 0.2
    _run_stage(console, 0.7)
    lines = err.getvalue().splitlines()
    still = [line for line in lines if "... still freezing and folding (" in line]
    assert len(still) >= 2, lines
    assert lines[0].endswith("freezing and folding signature 'serve'")
    assert not any("\x1b" in line for line in lines)  # no terminal codes in a log
    assert out.getvalue() == "result table\n"


def test_a_spinner_on_a_terminal():
    err = _Terminal()
    console = Console(out=io.StringIO(), err=err)
    _run_stage(console, 1.3)
    text = err.getvalue()
    assert "freezing and folding signature 'serve' (1 s)" in text  # the spinner's update
    assert "verifying 1 distinct signature(s)" in text
    assert "... still" not in text


def test_quiet_prints_nothing():
    err, out = io.StringIO(), io.StringIO()
    console = Console(quiet=True, out=out, err=err)
    console.heartbeat.every = 0.1
    _run_stage(console, 0.4)
    assert err.getvalue() == "" and out.getvalue() == ""
