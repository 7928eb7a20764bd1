"""The README's "Use it from tooling" examples run as written."""

from __future__ import annotations

import json
import re

import pytest

from app.cli import main
from tests.live import ROOT, live_server

README = (ROOT / "README.md").read_text()
SECTION = README.split("## Use it from tooling", 1)[1].split("\n## ", 1)[0]


def test_python_example_runs() -> None:
    (code,) = re.findall(r"```python\n(.*?)```", SECTION, re.S)
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
