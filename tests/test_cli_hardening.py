"""The commands as a new user and a careless one meet them: bad checkpoints, too long
prompts, outputs onto inputs, stdin prompts, Ctrl-C, --version, progress, the BLAS hint."""

import builtins
import hashlib
import importlib.metadata
import json
import re
import shutil
import time
from pathlib import Path

import mlx_lm
import pytest
import typer.rich_utils
from typer.testing import CliRunner

from optiq_dhara.cli import app, hints
from optiq_dhara.runtime import stream_text
from optiq_dhara.train.lora import LoraConfig, resolve_layers, run_lora

TRAINED = Path(__file__).parent / "fixtures" / "dhara_tiny_trained"
CORPUS = "\n".join(f"def f{i % 4}(x):\n    return x + {i % 4}\n" for i in range(60))
runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_errors(monkeypatch):
    """Error boxes as wide as their text: paths in messages stay whole."""
    monkeypatch.setattr(typer.rich_utils, "MAX_WIDTH", 10_000)


def invoke(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def message(result) -> str:
    """The output with rich's error box taken away and the lines joined."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def refused(result, *parts: str) -> str:
    """Assert a clean refusal (exit != 0, no traceback) naming every part; the message."""
    text = message(result)
    assert result.exit_code != 0, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    for part in parts:
        assert part in text, (part, text)
    return text


def copy_model(source: Path, folder: Path, **config_changes) -> Path:
    shutil.copytree(source, folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# 1. A checkpoint that is not a (whole) dhara: our message, no traceback.


def bad_checkpoint(kind: str, golden_dir: Path, folder: Path) -> tuple[Path, str]:
    """A broken copy of the golden checkpoint and what the message must say."""
    path = copy_model(golden_dir, folder)
    if kind == "llama":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        return path, "model_type is 'llama', not 'dhara_ar'"
    if kind == "no_config":
        (path / "config.json").unlink()
        return path, "has no config.json"
    if kind == "corrupt_config":
        (path / "config.json").write_text('{"model_type": "dhara_ar",')
        return path, "config.json cannot be read as JSON"
    assert kind == "no_tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    return path, "tokenizer"


@pytest.mark.parametrize("kind", ["llama", "no_config", "corrupt_config", "no_tokenizer"])
@pytest.mark.parametrize(
    "command", ["generate", "chat", "bench", "lora", "train", "eval", "eval_reference", "fuse"]
)
def test_a_non_dhara_checkpoint_is_refused_with_our_message(command, kind, golden_dir, tmp_path):
    path, expected = bad_checkpoint(kind, golden_dir, tmp_path / "bad")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "adapter_config.json").write_text("{}")
    args = {
        "generate": ["generate", "-m", path, "-p", "hi"],
        "chat": ["chat", "-m", path],
        "bench": ["bench", "-m", path],
        "lora": ["lora", "-m", path, "--data", tmp_path, "--adapter-path", tmp_path / "a"],
        "train": ["train", "-m", path, "--data", corpus, "--out", tmp_path / "out"],
        "eval": ["eval", "-m", path, "--perplexity", corpus],
        "eval_reference": ["eval", "-m", golden_dir, "--perplexity", corpus, "--reference", path],
        "fuse": ["fuse", "-m", path, "--adapter-path", adapters, "--save-path", tmp_path / "f"],
    }[command]
    refused(invoke(*args), expected, "bad")
    assert not (tmp_path / "out").exists() and not (tmp_path / "f").exists()


def test_a_hub_id_is_still_tried_and_a_missing_folder_named(tmp_path):
    result = invoke("generate", "-m", tmp_path / "nowhere", "-p", "hi")
    refused(result, "no such checkpoint directory", "--model")


# 2. Context length.


def test_generate_refuses_a_prompt_beyond_the_context(golden_dir, tmp_path):
    short = copy_model(golden_dir, tmp_path / "short", max_position_embeddings=64)
    result = invoke("generate", "-m", short, "-p", "x" * 60, "--max-tokens", 8)
    refused(result, "plus 8 new tokens", "beyond the model's context of 64")
    result = invoke("generate", "-m", short, "-p", "hello", "--max-tokens", 8, "--mode", "ar")
    assert result.exit_code == 0, result.output


def test_bench_refuses_a_prompt_length_beyond_the_context_at_once():
    started = time.perf_counter()
    result = invoke("bench", "-m", TRAINED, "--prompt-len", 100000)
    refused(result, "100000 tokens", "context of 2048", "--prompt-len")
    assert time.perf_counter() - started < 30


def test_chat_refuses_a_turn_beyond_the_context_and_goes_on(golden_dir, tmp_path):
    short = copy_model(golden_dir, tmp_path / "short", max_position_embeddings=64)
    result = invoke("chat", "-m", short, "--max-tokens", 64)
    refused(result, "context of 64")
    lines = ["x" * 80, "hi", "/quit"]
    result = invoke("chat", "-m", short, "--max-tokens", 4, input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "beyond the model's context of 64" in result.stderr
    assert "/reset forgets the history" in result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 1  # "hi" was answered


# 3. fuse and train never write over their inputs; an existing output needs --force.


@pytest.fixture(scope="module")
def lora_setup(golden_dir, tmp_path_factory):
    """A copy of the golden model and one-step adapters for it."""
    root = tmp_path_factory.mktemp("fuse")
    base = copy_model(golden_dir, root / "base")
    data = root / "data"
    data.mkdir()
    records = "".join(json.dumps({"text": f"the cat sat {i}"}) + "\n" for i in range(4))
    (data / "train.jsonl").write_text(records)
    config = LoraConfig(iters=1, batch_size=2, num_layers=-1, rank=2, spec_prompts=0)
    run_lora(base, data, root / "adapters", config, report=lambda entry: None)
    return base, root / "adapters"


def test_fuse_refuses_to_write_onto_or_into_its_inputs(lora_setup, tmp_path):
    base, adapters = lora_setup
    before = digest(base)
    for target, where in [
        (base, "is the base model's folder"),
        (base / "sub", "is inside the base model's folder"),
        (base.parent, "holds the base model's folder"),
        (adapters, "is the adapters"),
    ]:
        for force in ([], ["--force"]):
            result = invoke(
                "fuse", "-m", base, "--adapter-path", adapters, "--save-path", target, *force
            )
            refused(result, where, "--save-path")
    assert digest(base) == before and not (base / "sub").exists()


def test_fuse_replaces_an_existing_output_only_with_force(lora_setup, tmp_path):
    base, adapters = lora_setup
    out = tmp_path / "fused"
    args = ["fuse", "-m", base, "--adapter-path", adapters, "--save-path", out]
    assert invoke(*args).exit_code == 0
    (out / "stale.txt").write_text("left from before")
    refused(invoke(*args), "already exists", "--force")
    assert (out / "stale.txt").is_file()
    result = invoke(*args, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists()  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no temporary folder left
    mlx_lm.load(str(out))


def test_train_refuses_an_existing_output_and_its_inputs(golden_dir, tmp_path):
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(golden_dir / name, fresh / name)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    start = copy_model(golden_dir, tmp_path / "start")
    before = digest(start), digest(fresh)
    options = ["--data", corpus, "--iters", 2, "--batch-size", 2, "--seq-len", 32]
    options += ["--block-len", 16, "--held-out", 0.2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    from_config = ["train", "--config", fresh / "config.json", *options]
    refused(invoke(*from_config, "--out", out), "already exists", "--force")
    assert (out / "keep.txt").is_file()
    for force in ([], ["--force"]):
        refused(invoke(*from_config, "--out", fresh, *force), "is the --config file's folder")
        refused(invoke(*from_config, "--out", tmp_path, *force), "holds")
        from_model = ["train", "-m", start, *options, *force]
        refused(invoke(*from_model, "--out", start), "is the --model checkpoint")
        refused(invoke(*from_model, "--out", start / "next"), "is inside the --model checkpoint")
    assert (digest(start), digest(fresh)) == before
    result = invoke(*from_config, "--out", out, "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder is no output to lose
    assert invoke(*from_config, "--out", empty).exit_code == 0


# 4. lora --num-layers.


def test_lora_default_layers_fit_a_small_model(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(
        "".join(json.dumps({"text": f"class Record{i}:\n    pass\n"}) + "\n" for i in range(4))
    )
    adapters = tmp_path / "adapters"
    result = invoke(
        "lora",
        "-m",
        TRAINED,
        "--data",
        data,
        "--iters",
        1,
        "--batch-size",
        2,
        "--spec-prompts",
        0,
        "--adapter-path",
        adapters,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["num_layers"] == 4  # the shipped model's 4 layers, not 16


def test_lora_default_layers_are_16_of_a_deep_model():
    class Deep:
        layers = [None] * 32

    assert resolve_layers(Deep(), LoraConfig()).num_layers == 16
    assert resolve_layers(Deep(), LoraConfig(num_layers=-1)).num_layers == -1


# 5. eval --reference needs the same tokenizer.


def test_eval_reference_with_another_tokenizer_is_refused(golden_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(CORPUS)
    result = invoke("eval", "-m", golden_dir, "--perplexity", text, "--reference", TRAINED)
    refused(result, "does not share the tokenizer", "--reference")
    swapped = copy_model(golden_dir, tmp_path / "swapped")
    tokenizer = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = sorted(vocab)[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same tokens and size, two ids exchanged
    (swapped / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = invoke("eval", "-m", golden_dir, "--perplexity", text, "--reference", swapped)
    refused(result, "does not share the tokenizer", "2 tokens have another id")


# 6. --version.


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert importlib.metadata.version("optiq-dhara") in result.stdout


# 7. -p - reads stdin.


def test_generate_reads_the_prompt_from_stdin(golden_dir):
    prompt = "Hello\nworld"
    args = ["generate", "-m", golden_dir, "--max-tokens", 6, "--mode", "ar"]
    piped = invoke(*args, "-p", "-", input=prompt)
    given = invoke(*args, "-p", prompt)
    assert piped.exit_code == given.exit_code == 0, piped.output
    assert piped.stdout == given.stdout


def test_bench_reads_the_prompt_text_from_stdin():
    text = "class Record:\n    def __init__(self, name):\n        self.name = name\n"
    args = ["bench", "-m", TRAINED, "--prompt-len", 8, "--max-tokens", 2, "--mode", "ar"]
    result = invoke(*args, "--no-reference", "--prompt-file", "-", input=text)
    assert result.exit_code == 0, result.output
    assert "| dhara_tiny_trained | ar | 8 | 2 |" in result.stdout
    refused(invoke(*args, "--prompt-file", "/no/such/file"), "no such file")


# 8. Ctrl-C in chat.


def test_ctrl_c_ends_the_reply_not_the_chat(golden_dir, monkeypatch):
    import optiq_dhara.serve.console as console

    calls = []

    def interrupted(*args, **kwargs):
        calls.append(len(args[2]))  # messages so far
        stream = stream_text(*args, **kwargs)
        if len(calls) == 1:
            yield next(stream)
            stream.close()
            raise KeyboardInterrupt
        yield from stream

    monkeypatch.setattr(console, "stream_text", interrupted)
    lines = ["Hello", "Hello again", "/quit"]
    result = invoke(
        "chat", "-m", golden_dir, "--max-tokens", 6, "--mode", "ar", input="\n".join(lines) + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "[interrupted]" in result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("[ar]")]
    assert len(stats) == 1  # the second turn was answered
    assert calls == [1, 3]  # the cut reply stayed in the history


def test_ctrl_c_at_the_prompt_leaves(golden_dir, monkeypatch):
    def interrupt(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(builtins, "input", interrupt)
    result = invoke("chat", "-m", golden_dir)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


# 9. eval --perplexity progress.


def test_eval_perplexity_shows_progress(golden_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(CORPUS * 3)
    result = invoke(
        "eval", "-m", golden_dir, "--perplexity", text, "--seq-len", 32, "--batch-size", 2
    )
    assert result.exit_code == 0, result.output
    assert "perplexity:" in result.stderr and "row" in result.stderr


def test_divergence_by_batches_equals_one_compare(golden_dir, tmp_path):
    from optiq_dhara.evaluate.divergence import text_divergence, text_rows
    from optiq_dhara.metrics import compare

    model, tokenizer = mlx_lm.load(str(golden_dir))
    reference, _ = mlx_lm.load(str(TRAINED))
    text = tmp_path / "text.txt"
    text.write_text(CORPUS)
    updates = []

    class Bar:
        def __init__(self, total):
            updates.append(("total", total))

        def update(self, n):
            updates.append(n)

        def close(self):
            updates.append("closed")

    report = text_divergence(
        model, tokenizer, text, reference, seq_len=32, batch_size=3, seed=5, progress=Bar
    )
    rows = text_rows(tokenizer, text, 32)
    n = rows.shape[0]
    assert updates[0] == ("total", 2 * n) and updates[-1] == "closed"
    assert sum(u for u in updates if isinstance(u, int)) == 2 * n
    for mode in ("ar", "diffusion"):
        whole = compare(model, reference, rows, mode, seed=5, batch_size=3).as_dict()
        for key, value in whole.items():
            expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-6)
            assert report[mode][key] == expected, (mode, key)


# 10. The fast-BLAS hint.


@pytest.fixture
def hint_on(monkeypatch):
    monkeypatch.delenv(hints.SILENCE, raising=False)
    monkeypatch.setattr(hints, "_shown", False)
    monkeypatch.setattr(hints.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hints, "openblas_loaded", lambda: False)
    return monkeypatch


def test_blas_hint_once_on_stderr(golden_dir, hint_on):
    args = ["generate", "-m", golden_dir, "-p", "hi", "--max-tokens", 2, "--mode", "ar"]
    first, second = invoke(*args), invoke(*args)
    assert first.exit_code == second.exit_code == 0
    hint = [line for line in first.stderr.splitlines() if line.startswith("hint:")]
    assert len(hint) == 1
    for part in ("apt-get install libopenblas0-pthread", f"LD_PRELOAD={hints.OPENBLAS}"):
        assert part in hint[0]
    assert "hint:" not in second.stderr and "hint:" not in first.stdout


def test_blas_hint_conditions(hint_on):
    import mlx.core as mx

    assert hints.needs_blas_hint()
    hint_on.setenv(hints.SILENCE, "1")
    assert not hints.needs_blas_hint()
    hint_on.delenv(hints.SILENCE)
    hint_on.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not hints.needs_blas_hint()


def test_openblas_detection(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libm.so.6\n")
    assert not hints.openblas_loaded(str(maps))
    maps.write_text(f"7f00 r-xp {hints.OPENBLAS}\n")
    assert hints.openblas_loaded(str(maps))
