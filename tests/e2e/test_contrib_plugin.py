"""The contrib template plugin, installed with pip, is discovered and does its job end to end
through the real `mistralrs` command (CI installs it; see .ci/run and `nox -s contrib`)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

import pytest

try:
    importlib.metadata.distribution("mistralrs-calculator")
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

# In CI the plugin must be installed: a skip there would hide a broken install step.
pytestmark = pytest.mark.skipif(
    not INSTALLED and not os.environ.get("CI"),
    reason="pip install -e contrib/mistralrs-calculator to run",
)


def mistralrs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mistralrs", *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def test_contrib_plugin_is_listed_with_its_distribution():
    result = mistralrs("plugins", "--json")
    assert result.returncode == 0, result.stderr
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    calc = plugins["calculator"]
    assert calc["distribution"] == "mistralrs-calculator" and calc["version"] == "0.1.0"
    assert calc["first_party"] is False
    assert calc["hooks"] == ["register_tool_sources"]
    assert calc["registered"] == {"tool_source": ["calculator"]}


def test_contrib_tool_is_called_end_to_end():
    result = mistralrs("tools", "call", "calculate", '{"expression": "(17 + 25) * 3 / 7 - 2**10"}')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "-1006"
    listed = json.loads(mistralrs("tools", "list", "--json").stdout)
    # Other installed tool sources (the examples/ plugin in CI) list theirs too.
    assert "calculate" in [t["function"]["name"] for t in listed]


def test_contrib_tool_rejects_code():
    result = mistralrs("tools", "call", "calculate", '{"expression": "__import__(\'os\').system(\'true\')"}')
    assert result.stdout.startswith("error: unsupported syntax")


def test_allow_list_can_exclude_the_contrib_plugin():
    result = mistralrs("plugins", "--json", env={"MISTRALRS_DISABLE_PLUGIN_AUTOLOAD": "1"})
    names = {p["name"] for p in json.loads(result.stdout)["plugins"]}
    assert "calculator" not in names and "attention_sdpa" in names
    result = mistralrs("tools", "call", "calculate", "{}", env={"MISTRALRS_PLUGINS": "someone-else"})
    assert result.returncode == 1 and "unknown tool 'calculate'" in result.stderr


def test_bad_tool_arguments_are_a_one_line_error():
    result = mistralrs("tools", "call", "calculate", "{not json")
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "not valid JSON" in result.stderr
