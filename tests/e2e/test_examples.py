"""Every example under examples/ runs here, offline, so none of them can rot.

Examples are discovered, not listed: each kind below has a runner, and a new file of a known
kind is run as soon as it exists. A file no runner covers fails `test_every_example_is_covered`,
and one the index (examples/README.md) does not name fails `test_the_index_names_every_example`.

* examples/python_api/*.py  the Python API: run in this process (runpy, as `__main__`, cwd in a
                            temporary directory) against the `demo` model
* examples/openai_sdk/*.py  the openai SDK, in this process, against one `mistralrs serve -m demo`
                            subprocess shared by the module (URL as argv[1])
* examples/curl/*.sh        bash scripts against the same server
* examples/from_config/*.toml  `mistralrs from-config` on a free port; local model directories are
                            built with examples/python_api/make_tiny_model.py, as the files say
* examples/mcp/              `mistralrs serve -m demo --mcp-config mcp-config.json --mcp-port P` (the
                            stdio server adder_server.py as its MCP client's tool source), then
                            mcp_client.py (the SDK's client) against the MCP server
* examples/<dir>/pyproject.toml  a plugin package: must be pip-installed (CI does it, see .ci/run);
                            it is discovered, registers what it says, and the scripts next to
                            pyproject.toml run

The demo model has random weights: checks are on structure (exit status, finish reasons, JSON
that follows the schema), never on content.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FINISH_REASONS = {"stop", "length", "tool_calls"}
IGNORED_PARTS = {"__pycache__", "build", "dist", ".pytest_cache"}

pytestmark = pytest.mark.timeout(300)


# -- discovery ---------------------------------------------------------------------------------
def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.rglob("*") if p.is_file() and not (
        IGNORED_PARTS & set(p.relative_to(EXAMPLES).parts)
        or any(part.endswith(".egg-info") for part in p.parts) or p.suffix == ".pyc"))


def plugin_dirs() -> list[Path]:
    return sorted(p.parent for p in EXAMPLES.glob("*/pyproject.toml"))


def plugin_scripts() -> list[Path]:
    return sorted(s for d in plugin_dirs() for s in d.glob("*.py"))


def rel(path: Path) -> str:
    return path.relative_to(EXAMPLES).as_posix()


def kinds() -> dict[str, list[Path]]:
    return {
        "python_api": sorted(EXAMPLES.glob("python_api/*.py")),
        "openai_sdk": sorted(EXAMPLES.glob("openai_sdk/*.py")),
        "curl": sorted(EXAMPLES.glob("curl/*.sh")),
        "from_config": sorted(EXAMPLES.glob("from_config/*.toml")),
        "mcp": sorted(EXAMPLES.glob("mcp/*")),
        "plugin_script": plugin_scripts(),
    }


def covered(path: Path) -> bool:
    if path.name == "README.md" or any(path in paths for paths in kinds().values()):
        return True
    # The rest of a plugin package (pyproject.toml, its modules) is exercised by the plugin tests.
    return any(d in path.parents for d in plugin_dirs())


def ids(paths: list[Path]) -> list[str]:
    return [rel(p) for p in paths]


def test_every_example_is_covered():
    uncovered = [rel(p) for p in example_files() if not covered(p)]
    assert not uncovered, (f"no test runs {uncovered}: put the example under a directory this file runs "
                           "(see its docstring) or add a runner for the new kind to tests/e2e/test_examples.py")
    assert all(kinds().values()) and plugin_dirs(), "an example kind has no examples left"


def test_the_index_names_every_example():
    index = (EXAMPLES / "README.md").read_text()
    missing = [rel(p) for paths in kinds().values() for p in paths if rel(p) not in index]
    missing += [rel(d) + "/" for d in plugin_dirs() if rel(d) + "/" not in index]
    assert not missing, f"examples/README.md does not mention {missing}"


# -- shared helpers -----------------------------------------------------------------------------
def finish_reasons(out: str) -> list[str]:
    reasons = re.findall(r"finish_reason: (\S+)", out)
    assert set(reasons) <= FINISH_REASONS, out
    return reasons


def run_in_process(path: Path, argv: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[dict, str]:
    """Run a Python example as `python path *argv` would, in this process (torch is imported once
    for all of them); returns the script's globals and its stdout."""
    for var in ("MISTRALRS_MODEL", "MISTRALRS_URL", "MISTRALRS_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # whatever an example writes lands here
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.syspath_prepend(str(path.parent))  # as python does for a script: its sibling modules
    before = set(sys.modules)
    try:
        scope = runpy.run_path(str(path), run_name="__main__")
    finally:  # forget the sibling modules it imported, so every example starts from its own files
        for name in set(sys.modules) - before:
            file = getattr(sys.modules[name], "__file__", None)
            if file and Path(file).resolve().parent == path.parent:
                del sys.modules[name]
    out = capsys.readouterr().out
    assert out.strip(), f"{rel(path)} printed nothing"
    return scope, out


def http(url: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Server:
    """A `mistralrs` server subprocess started on port 0; the URL comes from its first log line."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        self.log: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "mistralrs", *argv], cwd=cwd, stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     # One torch thread, as the other server tests: the server must not
                                     # fight this process (which runs the clients) for the cores.
                                     env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                          "OMP_NUM_THREADS": "1"})
        first = self.proc.stderr.readline()
        self.log.append(first)
        m = re.search(r"serving .+ on (http://127\.0\.0\.1:\d+)", first)
        if not m:
            self.stop()
            pytest.fail(f"mistralrs {' '.join(argv)} did not start: {first}{self.proc.stderr.read()}")
        self.url = m.group(1)
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        deadline = time.time() + 120
        while not self.ready():  # 503 until every model has loaded
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"mistralrs {' '.join(argv)} did not become ready: {''.join(self.log)}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:  # 503 until every model loaded
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: drain (nothing is in flight), then exit 0
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server():
    srv = Server(["serve", "-m", "demo", "--port", "0", "--host", "127.0.0.1", "--max-seqs", "8"])
    yield srv.url
    srv.stop()
    assert srv.proc.returncode == 0, "".join(srv.log)


# -- the Python API -------------------------------------------------------------------------------
def check_chat(scope: dict, out: str) -> None:
    assert len(finish_reasons(out)) == 2 and re.search(r"usage: \d+ prompt \+ \d+ completion tokens", out)
    assert re.search(r"cached prompt tokens: [1-9]", out), "the follow-up turn should reuse the prefix cache"


def check_streaming(scope: dict, out: str) -> None:
    assert len(finish_reasons(out)) == 1 and re.search(r"usage: \d+ tokens", out)


def check_async(scope: dict, out: str) -> None:
    assert len(re.findall(r"-> (stop|length): ", out)) == 3 and len(finish_reasons(out)) == 1


def check_tool_calling(scope: dict, out: str) -> None:
    assert re.search(r"engine ran get_weather\(\{\"city\": \"(Paris|London|Tokyo)\"\}\) -> 'sunny", out)
    assert finish_reasons(out) == ["tool_calls"]
    assert re.search(r"called get_time\(tz=(UTC|CET|JST)\); answer:", out)


def check_structured_output(scope: dict, out: str) -> None:
    import jsonschema

    user = json.loads(re.search(r"^json_schema: (.*)$", out, re.M).group(1))
    jsonschema.validate(user, scope["USER"])
    assert re.fullmatch(scope["DATE"], re.search(r"^regex: (.*)$", out, re.M).group(1))
    assert re.search(r"^lark: [0-9]{1,3}( [+-] [0-9]{1,3})*", out, re.M)


def check_multi_model(scope: dict, out: str) -> None:
    answers = re.findall(r"^\[(a|b)\] .* -> (stop|length): ", out, re.M)
    assert sorted(name for name, _ in answers) == ["a", "a", "b", "b"], out


def check_make_tiny_model(scope: dict, out: str) -> None:
    config = json.loads((Path(out.strip()) / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]


PYTHON_API_CHECKS: dict[str, Callable[[dict, str], None]] = {
    "chat.py": check_chat,
    "streaming.py": check_streaming,
    "async_chat.py": check_async,
    "tool_calling.py": check_tool_calling,
    "structured_output.py": check_structured_output,
    "multi_model.py": check_multi_model,
    "make_tiny_model.py": check_make_tiny_model,
}


@pytest.mark.parametrize("path", kinds()["python_api"], ids=ids(kinds()["python_api"]))
def test_python_api_example(path, tmp_path, monkeypatch, capsys):
    scope, out = run_in_process(path, [], tmp_path, monkeypatch, capsys)
    finish_reasons(out)
    PYTHON_API_CHECKS.get(path.name, lambda scope, out: None)(scope, out)


# -- the openai SDK and curl against `mistralrs serve -m demo` ------------------------------------
def check_openai_chat(scope: dict, out: str) -> None:
    assert "models: ['default', 'demo']" in out and len(finish_reasons(out)) == 1


def check_openai_streaming(scope: dict, out: str) -> None:
    assert len(finish_reasons(out)) == 1 and re.search(r"usage: \d+ completion tokens", out)


def check_openai_tools(scope: dict, out: str) -> None:
    assert finish_reasons(out) == ["tool_calls"]
    assert re.search(r"called get_weather\(\{\"city\": \"(Paris|London|Tokyo)\"\}\) -> 'sunny", out)


def check_openai_json_schema(scope: dict, out: str) -> None:
    import jsonschema

    jsonschema.validate(json.loads(re.search(r"^json_schema: (.*)$", out, re.M).group(1)), scope["SCHEMA"])
    assert re.search(r"^pydantic: User\(name=.*, age=\d+, role='(admin|editor|viewer)'\)$", out, re.M)


def check_openai_responses(scope: dict, out: str) -> None:
    assert len(re.findall(r"^resp_\w+ \[(completed|incomplete)\]", out, re.M)) == 3, out


OPENAI_CHECKS: dict[str, Callable[[dict, str], None]] = {
    "chat.py": check_openai_chat,
    "streaming.py": check_openai_streaming,
    "tools.py": check_openai_tools,
    "json_schema.py": check_openai_json_schema,
    "responses.py": check_openai_responses,
}


@pytest.mark.parametrize("path", kinds()["openai_sdk"], ids=ids(kinds()["openai_sdk"]))
def test_openai_sdk_example(path, server, tmp_path, monkeypatch, capsys):
    scope, out = run_in_process(path, [server], tmp_path, monkeypatch, capsys)
    finish_reasons(out)
    OPENAI_CHECKS.get(path.name, lambda scope, out: None)(scope, out)


@pytest.mark.parametrize("path", kinds()["curl"], ids=ids(kinds()["curl"]))
def test_curl_example(path, server, tmp_path):
    if shutil.which("curl") is None and not os.environ.get("CI"):
        pytest.skip("curl is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("MISTRALRS_URL", "MISTRALRS_API_KEY")}
    result = subprocess.run(["bash", str(path), server], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "data: [DONE]" in out  # the stream ran to its end
    bodies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert bodies, out
    for body in bodies:
        assert body.get("error") is None, body
        for choice in body.get("choices", []):
            assert choice["finish_reason"] in FINISH_REASONS
    if path.name == "chat.sh":
        chats = [b for b in bodies if b.get("object") == "chat.completion"]
        schema, date = chats[1]["choices"][0]["message"]["content"], chats[2]["choices"][0]["message"]["content"]
        assert set(json.loads(schema)) == {"city", "is_capital"}
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date)
        assert any(b.get("object") == "response" for b in bodies) and any("tokens" in b for b in bodies)


# -- mistralrs from-config ------------------------------------------------------------------------
@pytest.mark.parametrize("path", kinds()["from_config"], ids=ids(kinds()["from_config"]))
def test_from_config_example(path, tmp_path):
    config = tomllib.loads(path.read_text())
    ids_ = [m["model_id"] for m in config["models"]]
    for model_id in ids_:
        if model_id.startswith("./"):
            subprocess.run([sys.executable, str(EXAMPLES / "python_api" / "make_tiny_model.py"), model_id],
                           cwd=tmp_path, check=True, capture_output=True, timeout=60)
    # The file as given, but on a free port (the first log line names it).
    text, n = re.subn(r"(?m)^port = \d+", "port = 0", path.read_text())
    assert n == 1, "expected one `port = N` line in [server]"
    (tmp_path / path.name).write_text(text)
    srv = Server(["from-config", "-f", path.name], cwd=tmp_path)
    try:
        status, listed = http(srv.url + "/v1/models")
        assert status == 200 and [m["id"] for m in listed["data"]] == ["default", *ids_]
        default = config.get("default_model_id", ids_[0])
        for model in ["default", *ids_]:
            status, body = http(srv.url + "/v1/chat/completions",
                                {"model": model, "messages": "Hello!", "max_tokens": 8})
            assert status == 200, body
            assert body["model"] == (default if model == "default" else model)
            assert body["choices"][0]["finish_reason"] in FINISH_REASONS
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, "".join(srv.log)


# -- MCP: the server's MCP client (a stdio tool server) and its MCP server (the SDK's client) ------------
def test_mcp_examples(tmp_path, monkeypatch, capsys):
    pytest.importorskip("mcp")
    import socket

    names = sorted(p.name for p in kinds()["mcp"])
    assert names == ["adder_server.py", "mcp-config.json", "mcp_client.py"], names
    config = json.loads((EXAMPLES / "mcp" / "mcp-config.json").read_text())
    # As the README runs it from the repository root, with this interpreter as `python3`.
    config["servers"][0]["source"].update(command=sys.executable, args=[str(EXAMPLES / "mcp" / "adder_server.py")])
    (tmp_path / "mcp-config.json").write_text(json.dumps(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mcp_port = s.getsockname()[1]
    srv = Server(["serve", "-m", "demo", "--port", "0", "--host", "127.0.0.1", "--mcp-port", str(mcp_port),
                  "--mcp-config", str(tmp_path / "mcp-config.json")], cwd=tmp_path)
    try:
        status, listed = http(srv.url + "/v1/models")
        assert status == 200 and listed["data"][0]["mcp_tools_count"] == 1, listed
        assert listed["data"][0]["mcp_servers_connected"] == 1
        _, out = run_in_process(EXAMPLES / "mcp" / "mcp_client.py", [f"http://127.0.0.1:{mcp_port}/mcp"], tmp_path,
                                monkeypatch, capsys)
        assert "server: mistralrs" in out and "tool: chat:" in out and "answer:" in out
        assert "unknown tool: Unknown tool: no_such_tool" in out
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, "".join(srv.log)


# -- the plugin package -----------------------------------------------------------------------------
def mistralrs_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mistralrs", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def installed_plugin(plugin_dir: Path) -> dict:
    """The package's name and entry points; fails (never skips) when it is not installed from here."""
    project = tomllib.loads((plugin_dir / "pyproject.toml").read_text())["project"]
    how = f"install it as CI does: python -m pip install -e examples/{plugin_dir.name}"
    try:
        dist = importlib.metadata.distribution(project["name"])
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the example plugin {project['name']} is not installed; {how}")
    for ep in dist.entry_points.select(group="mistralrs"):
        origin = Path(importlib.util.find_spec(ep.value.partition(":")[0]).origin).resolve()
        assert plugin_dir.resolve() in origin.parents, f"{ep.value} is imported from {origin}, not this example; {how}"
    return project


@pytest.mark.parametrize("plugin_dir", plugin_dirs(), ids=ids(plugin_dirs()))
def test_plugin_is_discovered(plugin_dir):
    project = installed_plugin(plugin_dir)
    result = mistralrs_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert not [f for f in listing["failed"] if f.get("distribution") == project["name"]], listing["failed"]
    plugins = {p["name"]: p for p in listing["plugins"]}
    for name in project["entry-points"]["mistralrs"]:
        plugin = plugins[name]
        assert plugin["distribution"] == project["name"] and plugin["version"] == project["version"]
        assert plugin["first_party"] is False and plugin["registered"], plugin


def test_example_plugin_registers_an_architecture_and_a_tool_source():
    plugin_dir = EXAMPLES / "mistralrs-example-plugin"
    installed_plugin(plugin_dir)
    plugin = {p["name"]: p for p in json.loads(mistralrs_cli("plugins", "--json").stdout)["plugins"]}["example_plugin"]
    assert plugin["hooks"] == ["register_architectures", "register_tool_sources"]
    assert plugin["registered"] == {"architecture": ["parallel_llama"], "tool_source": ["units"]}

    result = mistralrs_cli("tools", "list", "--json")
    assert result.returncode == 0, result.stderr
    assert "convert_units" in [t["function"]["name"] for t in json.loads(result.stdout)]
    result = mistralrs_cli("tools", "call", "convert_units", '{"value": 5, "from_unit": "km", "to_unit": "mi"}')
    assert result.returncode == 0 and result.stdout.strip() == "5 km = 3.10686 mi", result.stdout + result.stderr


def check_plugin_demo(scope: dict, out: str) -> None:
    # The checkpoint names ParallelLlamaForCausalLM: only the plugin's architecture can load it.
    assert re.search(r"^parallel_llama generated \((stop|length)\): ", out, re.M), out
    assert re.search(r"^the model called convert_units\(\{.*\}\) -> '\S+ \w+ = \S+ \w+'$", out, re.M), out


PLUGIN_SCRIPT_CHECKS: dict[str, Callable[[dict, str], None]] = {
    "mistralrs-example-plugin/demo.py": check_plugin_demo,
}


@pytest.mark.parametrize("path", plugin_scripts(), ids=ids(plugin_scripts()))
def test_plugin_script(path, tmp_path, monkeypatch, capsys):
    installed_plugin(path.parent)
    scope, out = run_in_process(path, [], tmp_path, monkeypatch, capsys)
    finish_reasons(out)
    PLUGIN_SCRIPT_CHECKS.get(rel(path), lambda scope, out: None)(scope, out)
