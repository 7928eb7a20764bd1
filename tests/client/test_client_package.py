"""The client installs and imports alone (issue 24): ``kvm-memattr-client`` in a fresh venv, beside
a project with its own ``app`` package, runs the README's example against a running service; and
it is built from the service's own files, so every model is defined once."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.live import ROOT, live_server
from tests.client.test_readme import SECTION, python_example

SERVICE = tomllib.loads((ROOT / "pyproject.toml").read_text())
CLIENT = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
CLIENT_FILES = ("app/client", "app/models")
"""The service's packages the client distribution is built from (kvm_memattr_client.client, .models)."""

# What the client alone must not bring: the service, its framework and server, its engine's dependencies.
SERVER_SIDE = {"kvm-memattr", "fastapi", "starlette", "uvicorn", "sortedcontainers", "asgi-lifespan", "jinja2"}

PROJECT_APP = '''"""A user's own FastAPI-style package, named app as they usually are."""
WHOSE = "the project's"
'''
PROJECT_MAIN = 'raise RuntimeError("the client imported the project\'s own app.main")\n'
CHECK = """
import app
from kvm_memattr_client import Client
from kvm_memattr_client.models.state import Vm

assert app.WHOSE == "the project's", app.__file__
assert Vm.__module__ == "kvm_memattr_client.models.state"
try:
    Client.in_process()
except RuntimeError as e:
    print(e)
else:
    raise AssertionError("in_process() without the service")
"""
INSTALLED = "import importlib.metadata as m, json; print(json.dumps([d.metadata['Name'] for d in m.distributions()]))"


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


@pytest.mark.slow
def test_client_installs_alone_and_runs_the_readme_example_beside_an_app_package(tmp_path: Path) -> None:
    # The client's sources as a checkout holds them, and nothing else of the service.
    checkout, project, venv = tmp_path / "checkout", tmp_path / "project", tmp_path / "venv"
    for part in ("client", *CLIENT_FILES):
        ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        shutil.copytree(ROOT / part, checkout / part, ignore=ignore)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "KVM_MEMATTR_URL"}}

    def python(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``argv`` run by the fresh venv's python (never the dev venv's, nor this checkout's)."""
        return subprocess.run(
            [str(venv / "bin" / "python"), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    # The README's install command.
    (install,) = re.findall(r"`python3 (-m pip install \./client)`", SECTION)
    done = python(*install.split(), cwd=checkout, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    installed = {_name(d) for d in json.loads(python("-c", INSTALLED, cwd=tmp_path).stdout)}
    assert {"kvm-memattr-client", "httpx", "pydantic"} <= installed
    assert not installed & SERVER_SIDE, installed & SERVER_SIDE

    (project / "app").mkdir(parents=True)
    (project / "app" / "__init__.py").write_text(PROJECT_APP)
    (project / "app" / "main.py").write_text(PROJECT_MAIN)
    (project / "check.py").write_text(CHECK)
    with live_server() as (url, _):  # the service, from this (the dev) environment
        (project / "example.py").write_text(python_example(url))
        ran = python("example.py", cwd=project)
        assert ran.returncode == 0, ran.stderr
    checked = python("check.py", cwd=project)
    assert checked.returncode == 0, checked.stderr
    assert "pip install kvm-memattr" in checked.stdout, checked.stdout


def test_the_client_distribution_is_the_service_s_files_at_its_version() -> None:
    """client/pyproject.toml maps the service's packages under kvm_memattr_client, as the service's own
    pyproject does, and pins what the service pins."""
    assert CLIENT["project"]["version"] == SERVICE["project"]["version"]
    assert set(CLIENT["project"]["dependencies"]) <= set(SERVICE["project"]["dependencies"])
    for part in CLIENT_FILES:
        name = "kvm_memattr_client." + part.split("/")[1]
        assert CLIENT["tool"]["setuptools"]["package-dir"][name] == f"../{part}"
        assert SERVICE["tool"]["setuptools"]["package-dir"][name] == part


def test_the_service_wheel_lists_every_package_of_app() -> None:
    """The packages are listed (the client's need a mapping), so a new one must be added there."""
    found = {
        ".".join(d.relative_to(ROOT).parts)
        for d in [ROOT / "app", *(ROOT / "app").rglob("*")]
        if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))
    }
    assert found <= set(SERVICE["tool"]["setuptools"]["packages"])


def test_the_client_s_files_import_the_service_only_for_in_process() -> None:
    """Installed as kvm_memattr_client there is no ``app``: the client and the models reach each
    other relatively, and ``app`` only where in_process() imports the service."""
    absolute = set()
    for part in CLIENT_FILES:
        for path in sorted((ROOT / part).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
                absolute |= {(path.relative_to(ROOT).as_posix(), n) for n in names if n.partition(".")[0] == "app"}
    assert absolute == {("app/client/__init__.py", "app.main"), ("app/client/__init__.py", "app.settings")}
