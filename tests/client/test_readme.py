"""The README's "Use it from tooling" examples run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from app.cli import main
from harness.live import ROOT, free_port, live_server

README = (ROOT / "README.md").read_text()
SECTION = README.split("## Use it from tooling", 1)[1].split("\n## ", 1)[0]
EXAMPLE_URL = "http://127.0.0.1:8000"


def python_example(url: str) -> str:
    """The section's Python example, its client onto ``url`` (the README's names 127.0.0.1:8000)."""
    (code,) = re.findall(r"```python\n(.*?)```", SECTION, re.S)
    assert f'Client("{EXAMPLE_URL}")' in code
    return code.replace(EXAMPLE_URL, url)


def test_python_example_runs_against_a_server() -> None:
    with live_server() as (url, _):
        exec(compile(python_example(url), "README.md", "exec"), {})


def test_python_example_runs_in_process() -> None:
    code = python_example(EXAMPLE_URL).replace(f'Client("{EXAMPLE_URL}")', "Client.in_process()")
    exec(compile(code, "README.md", "exec"), {})


def test_cli_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    (script,) = re.findall(r"```sh\n(.*?)```", SECTION, re.S)
    lines = script.strip().splitlines()
    assert lines[0].startswith("VM=$(kvm-memattr --json vm create")
    with live_server() as (url, _):
        assert main(["--url", url, "--json", "vm", "create", "--semantics", "linux"]) == 0
        vm = json.loads(capsys.readouterr().out)["id"]
        for line in lines[1:]:
            argv = line.replace("$VM", vm).split()
            assert argv[0] == "kvm-memattr"
            assert main(["--url", url, *argv[1:]]) == 0, line
        out = capsys.readouterr().out
        assert "retry" in out and "tlb_flush" in out


def test_try_it_runs_as_written_one_json_line_per_answer() -> None:
    """The "Try it" curls, run by a shell against a server on the port they name."""
    if shutil.which("curl") is None:
        pytest.skip("no curl on this machine")
    (script,) = re.findall(r"```sh\n(.*?)```", README.split("## Try it", 1)[1].split("\n## ", 1)[0], re.S)
    port = free_port()
    with live_server(port=port):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script.replace("localhost:8000", f"localhost:{port}")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == script.count("curl -s -w") and all(json.loads(a) for a in answers), done.stdout
    assert json.loads(answers[-1])["events"], "the trace of what was done"
