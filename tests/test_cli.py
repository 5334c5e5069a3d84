"""`dhara-mlx generate`, `chat`, `serve` and `lm`: typer's runner and the installed script."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlx_lm
import pytest
import typer
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.runtime import stream_text

MINE = ["generate", "chat", "serve", "lm"]
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(golden_dir):
    return mlx_lm.load(str(golden_dir))


def runtime_text(tiny, prompt, *, chat=False, **options) -> str:
    model, tokenizer = tiny
    return "".join(c.text for c in stream_text(model, tokenizer, prompt, chat=chat, **options))


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.mark.parametrize("mode", ["ar", "diffusion", "spec"])
def test_generate_prints_the_runtime_text_then_a_stats_line(tiny, golden_dir, mode):
    result = invoke(
        "generate", "--model", golden_dir, "--prompt", "Hello", "--mode", mode, "--max-tokens", 10
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == runtime_text(tiny, "Hello", mode=mode, max_tokens=10) + "\n"
    stats = result.stderr.strip()
    assert stats.startswith(f"[{mode}] 10 tokens, ")
    for part in ("tok/s", "tokens/forward", "drafts accepted", "finish: length"):
        assert part in stats


def test_generate_chat_sampling_and_stop(tiny, golden_dir):
    sampling = [
        "--temp",
        0.8,
        "--top-p",
        0.9,
        "--top-k",
        40,
        "--repetition-penalty",
        1.1,
        "--seed",
        3,
    ]
    args = [
        "generate",
        "-m",
        golden_dir,
        "-p",
        "Hello",
        "--chat",
        "--system",
        "Be brief.",
        "--max-tokens",
        8,
    ]
    first, second = invoke(*args, *sampling), invoke(*args, *sampling)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    options = dict(temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=3)
    expected = runtime_text(tiny, messages, chat=True, mode="spec", max_tokens=8, **options)
    assert first.stdout == second.stdout == expected + "\n"

    full = runtime_text(tiny, "Hello", mode="spec", max_tokens=12)
    stopped = invoke(
        "generate", "-m", golden_dir, "-p", "Hello", "--max-tokens", 12, "--stop", full[4:7]
    )
    assert stopped.stdout == full[: full.find(full[4:7])] + "\n"
    assert "finish: stop" in stopped.stderr


def test_generate_refuses_bad_input_with_a_message(golden_dir, tmp_path):
    result = invoke("generate", "--model", tmp_path / "missing", "--prompt", "x")
    assert result.exit_code == 2 and "missing" in result.output and "--model" in result.output
    result = invoke("generate", "--model", golden_dir, "--prompt", "x", "--mode", "turbo")
    assert result.exit_code == 2 and "turbo" in result.output
    result = invoke("generate", "--model", golden_dir, "--prompt", "", "--max-tokens", 2)
    assert result.exit_code == 2 and "empty" in result.output


def test_chat_keeps_history_and_switches_mode(tiny, golden_dir):
    lines = [
        "Hello",
        "/mode ar",
        "How are you?",
        "/mode turbo",
        "/foo",
        "/reset",
        "Hello",
        "/quit",
        "never read",
    ]
    result = invoke(
        "chat",
        "-m",
        golden_dir,
        "--temp",
        0,
        "--repetition-penalty",
        1,
        "--max-tokens",
        8,
        input="\n".join(lines) + "\n",
    )
    assert result.exit_code == 0, result.output
    options = dict(max_tokens=8, temperature=0.0, top_p=0.9, repetition_penalty=1.0)
    first = [{"role": "user", "content": "Hello"}]
    reply1 = runtime_text(tiny, first, chat=True, mode="spec", **options)
    second = first + [
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": "How are you?"},
    ]
    reply2 = runtime_text(tiny, second, chat=True, mode="ar", **options)
    reply3 = runtime_text(tiny, first, chat=True, mode="ar", **options)  # after /reset
    out = result.stdout
    assert f"> {reply1}\n> mode: ar\n> {reply2}\n> > > history cleared\n> {reply3}\n> " in out
    assert "/mode takes one of ar, diffusion, spec; got 'turbo'" in result.stderr
    assert "unknown command /foo" in result.stderr
    modes = [line.split("]")[0] for line in result.stderr.splitlines() if line.startswith("[")]
    assert modes == ["[spec", "[ar", "[ar"]  # nothing after /quit was answered


def test_chat_ends_at_end_of_input(golden_dir):
    result = invoke("chat", "-m", golden_dir, "--max-tokens", 2, input="/help\n")
    assert result.exit_code == 0 and "/mode ar|diffusion|spec" in result.stdout


def test_lm_runs_stock_mlx_lm_commands_with_dhara_registered(golden_dir):
    result = invoke("lm", "generate", "--model", golden_dir, "--prompt", "hi", "--max-tokens", 4)
    assert result.exit_code == 0, result.output
    assert "Generation: 4 tokens" in result.output
    result = invoke("lm", "server", "--help")
    assert (
        result.exit_code == 0
        and "dhara-mlx lm server" in result.output
        and "--model" in result.output
    )
    result = invoke("lm", "bogus")
    assert result.exit_code == 2 and "'bogus' is not an mlx-lm command" in result.output


@pytest.mark.parametrize("name", MINE)
def test_every_option_is_explained(name):
    command = typer.main.get_command(app).commands[name]
    for param in command.params:
        assert getattr(param, "help", None), f"{name}: {param.name} has no help"
    result = invoke(name, "--help")
    assert result.exit_code == 0
    assert command.help.split("\n")[0].split()[0] in result.output


def test_serve_refuses_a_model_it_cannot_load(tmp_path):
    result = invoke("serve", "--model", tmp_path / "missing", "--port", 1)
    assert result.exit_code == 2 and "missing" in result.output


def installed() -> Path:
    return Path(sys.executable).parent / "dhara-mlx"


def test_the_installed_script_runs():
    result = subprocess.run([installed(), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for name in MINE:
        assert name in result.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_installed_serve_command_answers(tiny, golden_dir):
    port = free_port()
    server = subprocess.Popen(
        [
            installed(),
            "serve",
            "-m",
            golden_dir,
            "--port",
            str(port),
            "--max-tokens",
            "6",
            "--mode",
            "ar",
            "--api-key",
            "k",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        reply = httpx.post(
            f"{url}/v1/completions", json={"prompt": "Hello"}, headers={"Authorization": "Bearer k"}
        ).json()
        assert reply["choices"][0]["text"] == runtime_text(tiny, "Hello", mode="ar", max_tokens=6)
        assert reply["usage"]["completion_tokens"] == 6
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
