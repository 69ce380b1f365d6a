"""Shared end-to-end fixtures: one tiny real model per session, served in-process by the real
`openai_server` frontend on a free 127.0.0.1 port (its own event loop in a thread)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.tiny_models import write_tiny_llama


class ServerThread:
    """An `OpenAIServer` running on its own asyncio loop in a background thread."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server", daemon=True)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self.server.start())
        self.call(self.server.wait_loaded(), timeout=120)
        return self

    def stop(self, timeout: float = 5) -> None:
        try:
            self.call(self.server.shutdown(timeout), timeout=timeout + 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def state(self) -> Any:
        return self.server.state


@contextlib.contextmanager
def serve_process(*args: str, log: list[str] | None = None, env: dict[str, str] | None = None) -> Any:
    """`mistralrs serve ARGS --port 0 --host 127.0.0.1` as a user starts it; yields its base URL
    once `/health` says every model is loaded. Its stderr lines go to `log`."""
    from tests.helpers import server_process

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", "serve", *args, "--port", "0", "--host", "127.0.0.1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    lines = log if log is not None else []
    try:
        line = proc.stderr.readline()
        m = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
        assert m, f"unexpected first line {line!r}"
        threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
        url = f"http://127.0.0.1:{m.group(1)}"
        server_process.wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("server-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_service(tiny_model_dir):
    from mistralrs.serving import ModelService, ServiceOptions

    service = ModelService(ServiceOptions(model_id=str(tiny_model_dir), dtype="f32", max_seqs=32,
                                          pa_blk_size=16, pa_context_len=32 * 512))
    yield service
    service.shutdown()


def start_server(service: Any, **kwargs: Any) -> ServerThread:
    from mistralrs_plugins.frontends.openai_server.app import OpenAIServer

    kwargs.setdefault("host", "127.0.0.1")
    kwargs.setdefault("port", 0)
    kwargs.setdefault("announce", False)
    kwargs.setdefault("owns_service", False)
    return ServerThread(OpenAIServer(service, **kwargs)).start()


@pytest.fixture(scope="session")
def server(tiny_service):
    """The shared in-process server (no API key)."""
    srv = start_server(tiny_service)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def keyed_server(tiny_service):
    """A second server over the same engine that requires an API key ("sekrit")."""
    srv = start_server(tiny_service, api_key="sekrit")
    yield srv
    srv.stop()


# A ChatML template whose generation prompt opens a reasoning block (Qwen3-Thinking style) unless
# enable_thinking is false, and which drops the reasoning of earlier assistant turns.
THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '').split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is not defined or enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
    "{%- endif %}"
)


@pytest.fixture(scope="session")
def thinking_service(tiny_model_dir, tmp_path_factory):
    """The tiny model again, with `THINKING_TEMPLATE` (the `think` reasoning parser is picked
    from the `</think>` in the template)."""
    from mistralrs.serving import ModelService, ServiceOptions

    template = tmp_path_factory.mktemp("thinking-template") / "thinking.jinja"
    template.write_text(THINKING_TEMPLATE)
    service = ModelService(ServiceOptions(model_id=str(tiny_model_dir), dtype="f32", max_seqs=8, pa_blk_size=16,
                                          pa_context_len=4096, chat_template=str(template)))
    yield service
    service.shutdown()


@pytest.fixture(scope="session")
def thinking_server(thinking_service):
    srv = start_server(thinking_service)
    yield srv
    srv.stop()
