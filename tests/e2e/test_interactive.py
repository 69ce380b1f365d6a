"""`mistralrs run` driven through a pseudo-terminal, as a person would use it."""

from __future__ import annotations

import sys

import pytest

pexpect = pytest.importorskip("pexpect")


@pytest.fixture
def chat():
    child = pexpect.spawn(
        sys.executable, ["-m", "mistralrs", "run", "-m", "demo", "--max-tokens", "40", "--seed", "1"],
        encoding="utf-8", timeout=120, env={"PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin",
                                            "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    child.expect("Chat started")
    child.startup = child.before
    child.expect_exact("> ")
    yield child
    if child.isalive():
        child.terminate(force=True)


def test_demo_says_its_answers_are_random_and_chats(chat):
    assert "random weights" in chat.startup  # stderr and stdout share the terminal
    chat.sendline("\\help")
    chat.expect("Commands:")
    chat.expect_exact("> ")
    chat.sendline("\\system You are terse.")
    chat.expect_exact("[system prompt set]")
    chat.expect_exact("> ")
    chat.sendline("Hello there")
    chat.expect_exact("> ")  # an answer was streamed and the prompt came back
    chat.sendline("/temperature 0.2")
    chat.expect_exact("[temperature 0.2]")
    chat.sendline("\\topk 5")
    chat.expect_exact("[top-k 5]")
    chat.sendline("\\topp nope")
    chat.expect("needs a number")
    chat.sendline("\\clear")
    chat.expect_exact("[conversation cleared]")
    chat.sendline("\\exit")
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program(chat):
    chat.sendline("Tell me a long story")
    chat.expect_exact("Tell me a long story")
    chat.expect(r"\S")  # the answer is streaming (a Ctrl-C before it starts can still end the program: a known race)
    chat.sendintr()
    chat.expect_exact("> ")
    assert chat.isalive()
    chat.sendline("\\exit")
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0


def test_ctrl_d_quits(chat):
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.wait()
    assert chat.exitstatus == 0
