"""What a new user meets first (issue "first contact"): each item has a test that would have caught it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import httpx
import pytest

from app.cli import main
from harness.live import ROOT, live_server


@pytest.fixture(scope="module")
def url() -> object:
    with live_server() as (u, _):
        yield u


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tables_fit_80_columns_with_full_ids_and_headers(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    vm = json.loads(run(capsys, "vm", "create", "--json", "--url", url, "--name", "first")[1])["id"]
    assert run(capsys, "-q", "--url", url, "gmem", "create", vm, "--size", "4M")[0] == 0
    line = f"-q memslot set {vm} 10 --gpa 4G --size 4M --hva 0x7f0000000000 --flags 4 --gmem 3 --url {url}"
    assert run(capsys, *line.split())[0] == 0
    assert run(capsys, "-q", "fault", vm, "4G", "--url", url)[0] == 0
    for argv, header in (
        (["vm", "list"], ["id", "name", "type", "semantics", "host"]),
        (["profiles"], ["name", "kernel", "+types", "as", "attrs", "gmem", "max_gfn"]),
        (["events", vm], ["id", "time", "type", "detail"]),
        (["memslot", "list", vm], ["slot", "flags", "gpa", "size", "hva", "gmem"]),
        (["gmem", "list", vm], ["fd", "size", "flags", "bindings"]),
    ):
        code, out, _ = run(capsys, *argv, "--url", url)
        assert code == 0, argv
        lines = out.splitlines()
        assert all(len(line) <= 80 for line in lines), (argv, max(map(len, lines)))
        assert any(line.split() == header for line in lines), (argv, out)
    code, out, _ = run(capsys, "vm", "list", "--url", url)
    assert vm in out.split(), "the whole id, on one line, copyable"
    code, out, _ = run(capsys, "gmem", "list", vm, "--url", url)
    assert "slot 0xa @0x0+0x400000" in out and "{" not in out


def test_global_options_anywhere_and_the_demo_after_its_subcommand(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "health", "--json", "--url", url)
    assert code == 0 and json.loads(out)["status"] == "ok"
    code, out, _ = run(capsys, "demo", "--url", url, "-q")
    assert code == 0


def test_the_demo_falls_back_when_the_environment_url_is_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"KVM_MEMATTR_URL": dead, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, **env},
    )
    assert result.returncode == 0, result.stderr
    assert f"no server answers at {dead}" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--url", dead], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3 and f"cannot reach {dead}" in result.stderr and "None" not in result.stderr


def test_units_gfn_options_refuse_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["attrs", "get", "vm", "--start-gfn", "4G"])
    assert e.value.code == 2
    assert "expected an integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fault", "vm", "4G", "--mmu-seq", "abc"])
    err = capsys.readouterr().err
    assert "expected an integer" in err and "2M" not in err


def test_version_help_and_no_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and re.match(r"kvm-memattr \d+\.\d+", capsys.readouterr().out)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: kvm-memattr" in out and "COMMAND" in out and "``" not in out
    with pytest.raises(SystemExit):
        main(["memslot", "set", "--help"])
    help_text = capsys.readouterr().out
    assert "guest_phys_addr, bytes" in help_text and "(default: 0)" in help_text


def test_no_deprecation_warning_in_process() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::DeprecationWarning",
            "-c",
            "from app.client import Client\nwith Client.in_process() as k: print(k.healthz().status)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_serve_on_a_busy_port_says_so_in_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 3
    assert result.stderr.strip().count("\n") == 0 and "already in use" in result.stderr
    assert " ready at " not in result.stderr and "Traceback" not in result.stderr


def test_ci_ends_with_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(python3 -m venv .*)\n```", readme)
    assert len(commands) == 2 and commands[0].endswith("kvm-memattr serve")
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == commands[1]
    # Following the README in order: the tests' editable install must not replace the package the
    # running service was installed as (its /ui answered 500, TemplateNotFound).
    serve_venv, test_venv = (re.match(r"python3 -m venv (\S+)", c).group(1) for c in commands)  # type: ignore[union-attr]
    assert serve_venv != test_venv


def test_the_docker_smoke_script_names_no_package_host() -> None:
    script = (ROOT / "scripts" / "docker-smoke.sh").read_text()
    hosts = set(re.findall(r"https?://([^/:\s\"']+)", script)) - {"127.0.0.1"}
    assert hosts == set(), hosts


def test_cli_edges_of_round_two(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--url without a scheme, misspelled and abbreviated options named, --json errors on stdout,
    and a hint where attrs set meets an rfc-v9 VM."""
    bare = url.removeprefix("http://")
    code, out, err = run(capsys, "--url", bare, "--json", "health")
    assert code == 0 and json.loads(out)["status"] == "ok", err
    vm = json.loads(run(capsys, "--json", "--url", url, "vm", "create", "--semantics", "rfc-v9")[1])["id"]
    for typo in ("--privte", "--privat"):
        with pytest.raises(SystemExit) as exit_:
            main(["--url", url, "attrs", "set", vm, "0", "4K", typo])
        assert exit_.value.code == 2
        assert f"no option {typo} (did you mean --private?)" in capsys.readouterr().err
    code, out, err = run(capsys, "--url", url, "--json", "attrs", "set", vm, "0", "4K", "--private")
    assert code == 1 and json.loads(out)["errno"] == "ENOTTY"
    assert "reg-region / unreg-region" in err and "semantics linux" in err


def test_the_image_installs_from_pinned_constraints() -> None:
    """Two builds a month apart are the same image: every dependency, transitive ones too, pinned."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "-c constraints.txt ." in dockerfile and "!constraints.txt" in (ROOT / ".dockerignore").read_text()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
            assert version, f"{line}: not pinned to one version"
    # What the service needs, as installed in this environment, is pinned (names normalised).
    from importlib.metadata import distribution, requires

    wanted = {"kvm-memattr"}
    seen: set[str] = set()
    while wanted:
        name = wanted.pop()
        seen.add(name)
        for req in requires(name) or []:
            if "extra ==" in req and not ("standard" in req and name == "uvicorn"):
                continue
            dep = re.sub(r"[-_.]+", "-", re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0]).lower()
            if dep not in seen:
                try:
                    distribution(dep)
                except Exception:  # an environment marker that excluded it here
                    continue
                wanted.add(dep)
    missing = sorted(seen - {"kvm-memattr"} - pins.keys())
    assert not missing, f"not pinned in constraints.txt: {missing} (run scripts/update-constraints.sh)"


ADDRESS_LIKE = ("gfn", "gpa", "hva", "addr", "address", "size", "offset", "slot", "start", "end", "length", "pgoff")


def test_one_base_per_meaning_at_80_columns(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No value printed in two bases: gfns, gpas, sizes, offsets, page indexes and slot ids in hex
    whatever their size (was: below 0x10000 in decimal), counts and other ids in decimal."""
    monkeypatch.setenv("COLUMNS", "80")
    vm = json.loads(run(capsys, "--json", "--url", url, "vm", "create", "--semantics", "linux")[1])["id"]
    for line in (
        "gmem create {vm} --size 4M --flags 1",
        "memslot set {vm} 10 --gpa 0 --size 4M --hva 0x7f0000000000 --flags 4 --gmem 3",
        "fault {vm} 0x3000 --write",
        "attrs set {vm} 0x1000 4K --private",
        "prefault {vm} 0x8000 0x2000",
        "notifier start {vm} 0x7f0000000000 0x7f0000001000",
        "gmem fallocate {vm} 3 0x200000 0x10000",
        "gmem mmap {vm} 3 0x400000",
    ):
        assert run(capsys, "-q", "--url", url, *line.format(vm=vm).split())[0] == 0, line
    pairs: list[tuple[str, str]] = []
    out_keys: set[str] = set()
    for line in (
        "events {vm}",
        "vm get {vm}",
        "mmu {vm}",
        "gfn {vm} 3",
        "memslot list {vm}",
        "memslot get {vm} 10",
        "gmem list {vm}",
        "gmem pages {vm} 3",
    ):
        code, out, _ = run(capsys, "--url", url, *line.format(vm=vm).split())
        assert code == 0 and all(len(row) <= 80 for row in out.splitlines()), out
        pairs += re.findall(r"(\w+)=(\S+)", out)  # the event trace's details
        table = re.findall(r"^ ?([\w.]+) {2,}(\S+) *$", out, re.M)  # key-value tables
        pairs += table
        out_keys.update(k.rsplit(".", 1)[-1] for k, _ in table)
    checked = 0
    for key, value in pairs:
        name = key.rsplit(".", 1)[-1]
        address = name.rsplit("_", 1)[-1] in ADDRESS_LIKE or name in ADDRESS_LIKE or name == "userspace_addr"
        address |= key in ("id", "memslot.id") and "slot" in out_keys  # a memslot's id is a slot id
        if re.fullmatch(r"0x[0-9a-f]+", value):
            assert address, f"{key}={value}: a count in hex"
            checked += 1
        elif re.fullmatch(r"\d+", value):
            assert not address, f"{key}={value}: an address or size in decimal"
            checked += 1
    assert checked > 30, pairs


def test_one_default_semantics_on_every_surface(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """API, CLI, the page and Swagger UI's first example all create the same kind of VM by default."""
    default = httpx.post(f"{url}/v1/vms").json()["semantics"]
    cli = json.loads(run(capsys, "--json", "--url", url, "vm", "create")[1])["semantics"]
    page = httpx.get(f"{url}/ui").text
    first_option = re.search(r'<select name="semantics"><option>([\w-]+)</option>', page)
    spec = httpx.get(f"{url}/openapi.json").json()
    examples = spec["paths"]["/v1/vms"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    first_example = next(iter(examples.values()))["value"]["semantics"]
    assert first_option is not None
    assert default == cli == first_option.group(1) == first_example == "rfc-v9"


def test_more_cli_edges(url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """serve's help is its own; explore runs without a server and says by its status what it found;
    a negative size and an unaligned value are named; vm list keeps sw_protected whole at 80
    columns; the demo leaves one VM, not one per run."""
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert "--port" in help_text and "--url" not in help_text and "--json" not in help_text
    assert "--workers" not in help_text
    monkeypatch.delenv("KVM_MEMATTR_URL", raising=False)
    assert run(capsys, "explore", "--variant", "linux")[0] == 0  # no server: computed here
    assert run(capsys, "explore", "--variant", "reviewer-reorder", "--fail-nth", "2")[0] == 4
    vm = json.loads(run(capsys, "--json", "--url", url, "vm", "create", "--semantics", "linux")[1])["id"]
    with pytest.raises(SystemExit):
        main(["--url", url, "gmem", "create", vm, "--size", "-4M"])
    assert "--size -4M: a negative number" in capsys.readouterr().err
    code, _, err = run(capsys, "--url", url, "attrs", "set", vm, "1000", "4K", "--private")
    assert code == 1 and "address 0x3e8" in " ".join(err.split())  # 1000 read as decimal, said in hex
    code, out, _ = run(capsys, "--url", url, "vm", "list")
    assert code == 0 and "sw_protected" in out and all(len(line) <= 80 for line in out.splitlines())
    for _ in range(2):
        assert run(capsys, "-q", "--url", url, "demo")[0] == 0
    names = [v["name"] for v in json.loads(run(capsys, "--json", "--url", url, "vm", "list")[1])["vms"]]
    assert names.count("kvm-memattr-demo") == 1


def test_json_demo_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    """--json demo prints the story as one JSON document (it printed panels)."""
    code, out, _ = run(capsys, "--json", "demo", "--in-process")
    assert code == 0
    story = json.loads(out)
    assert len(story["steps"]) >= 5 and story["vm"]
    assert all(s["title"] and s["why"] for s in story["steps"])
    assert any(s["mmu"] and s["mmu"]["mmu_invalidate_seq"] > 0 for s in story["steps"])
