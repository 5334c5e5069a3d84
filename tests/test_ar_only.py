"""An AR-only dhara: a checkpoint without a MASK token, shaped like codelion/dhara-250m-ar-base.

Its config.json has no ``mask_token_id`` and its vocabulary is the tokenizer's,
not extended by a MASK row. Made here from the golden checkpoint by cutting the
embedding to the tokenizer's 316 tokens (the MASK row 316 and the three padding
rows after it go) and dropping ``<|mask|>`` from the tokenizer. It loads through
stock mlx-lm, decodes in AR exactly as the golden weights (which never emit MASK
or a padding id), and everything that needs MASK refuses it before any work,
naming the missing token.
"""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlx.core as mx
import mlx_lm
import pytest
from conftest import write_tokenizer_without_mask
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from typer.testing import CliRunner

from optiq_dhara.cli import app
from optiq_dhara.evaluate.divergence import divergence
from optiq_dhara.model import ModelArgs
from optiq_dhara.runtime import PrefixCache, decode, generate_batch, generate_ids
from optiq_dhara.runtime.decode import make_request
from optiq_dhara.runtime.engine import Engine
from optiq_dhara.serve.app import ServerConfig, background_server, create_app
from optiq_dhara.serve.engine import Worker
from optiq_dhara.train.lora import LoraConfig, run_lora

VOCAB = 316  # the golden tokenizer's tokens; MASK was 316
MISSING = r"needs the MASK token, and this dhara checkpoint has none"
REMEDY = r"add a MASK row to the embedding \(vocab_size 317"
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
runner = CliRunner()


def ar_only_copy(golden_dir: Path, path: Path, **config_changes) -> Path:
    """The golden checkpoint without its MASK token: config, weights and tokenizer."""
    path.mkdir(parents=True)
    config = json.loads((golden_dir / "config.json").read_text())
    del config["mask_token_id"]
    config.update(vocab_size=VOCAB, **config_changes)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = mx.load(str(golden_dir / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:VOCAB]
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    write_tokenizer_without_mask(golden_dir, path, VOCAB)
    return path


@pytest.fixture(scope="module")
def ar_dir(golden_dir, tmp_path_factory) -> Path:
    return ar_only_copy(golden_dir, tmp_path_factory.mktemp("ar_only") / "ckpt")


@pytest.fixture(scope="module")
def ar(ar_dir):
    return mlx_lm.load(str(ar_dir))


@pytest.fixture(scope="module")
def tri(golden_dir):
    return mlx_lm.load(str(golden_dir))


def ids_of(golden, key) -> list[int]:
    return golden[key].tolist()


# loading


@pytest.mark.parametrize(
    "changes",
    [{}, {"mask_token_id": VOCAB}, {"mask_token_id": 49152}, {"mask_token_id": None}],
    ids=["no mask_token_id", "id = vocab_size", "the default id", "null"],
)
def test_a_checkpoint_without_a_mask_row_loads_as_ar_only(golden_dir, tmp_path, changes):
    model, tokenizer = mlx_lm.load(str(ar_only_copy(golden_dir, tmp_path / "c", **changes)))
    assert model.args.mask_token_id is None and model.args.modes == ("ar",)
    assert model.model.embed_tokens.weight.shape == (VOCAB, 64)
    assert tokenizer.vocab_size == VOCAB


def test_the_modes_are_one_property_of_the_config():
    assert ModelArgs().modes == ("ar", "diffusion", "spec")  # SPEC: missing key = 49152 < 49155
    assert ModelArgs(vocab_size=49152).modes == ("ar",)  # dhara-250m-ar-base's vocabulary
    assert ModelArgs(vocab_size=64, mask_token_id=63).mask_token_id == 63
    with pytest.raises(ValueError, match=MISSING + r".*\(vocab_size 49152\).*" + "joint"):
        ModelArgs(vocab_size=49152).require_mask("block diffusion")


# AR: the same as the weights with a MASK row


def test_logits_are_the_golden_logits_without_the_mask_row(ar, tri, golden):
    ids = golden["ids_a"]
    assert mx.allclose(ar[0](ids), tri[0](ids)[..., :VOCAB], rtol=0, atol=1e-6)


@pytest.mark.parametrize("penalty, key", [(1.0, "greedy_p1"), (1.3, "greedy_p1_rep13")])
def test_runtime_ar_is_the_golden_sequence(ar, golden, penalty, key):
    expected = ids_of(golden, key)
    assert max(expected) < VOCAB  # the golden model never emits MASK or a padding id here
    out = generate_ids(
        ar[0], ids_of(golden, "prompt_p1"), mode="ar", max_tokens=40, repetition_penalty=penalty
    )
    assert out == expected


def test_stock_mlx_lm_generation_needs_no_mask_processor(ar, golden):
    prompt = golden["prompt_p1"]
    tokens = [int(t) for t, _ in generate_step(prompt, ar[0], max_tokens=40)]
    assert tokens == ids_of(golden, "greedy_p1")
    text = mlx_lm.generate(ar[0], ar[1], "Once upon a time", max_tokens=8)
    assert isinstance(text, str) and text


def test_batches_and_prompt_caches(ar, tri, golden):
    model = ar[0]
    prompts = [ids_of(golden, "prompt_p1"), ids_of(golden, "prompt_p2"), [5, 6, 7]]
    rows = generate_batch(model, prompts, max_tokens=12)
    assert rows == [generate_ids(model, p, max_tokens=12) for p in prompts]
    assert rows == [generate_ids(tri[0], p, max_tokens=12) for p in prompts]
    cache = PrefixCache()
    first = generate_ids(model, prompts[0], max_tokens=12, prefix_cache=cache)
    follow = prompts[0] + first + [9, 10]
    again = [s for s in decode(model, follow, max_tokens=6, prefix_cache=cache)]
    assert again[-1].stats.reused_tokens > 0
    assert [t for s in again for t in s.tokens] == generate_ids(model, follow, max_tokens=6)
    ids = mx.array([prompts[1]])  # mlx-lm's cache: trimmed, then continued = one forward
    kv = make_prompt_cache(model)
    model(ids, cache=kv)
    trim_prompt_cache(kv, 4)
    assert mx.allclose(model(ids[:, -4:], cache=kv), model(ids)[:, -4:], atol=1e-5)


def test_yarn_config(golden_dir, tmp_path, golden):
    yarn = {"rope_scaling": YARN, "max_position_embeddings": 256}  # 4 x 64 positions
    ar_yarn, tokenizer = mlx_lm.load(str(ar_only_copy(golden_dir, tmp_path / "a", **yarn)))
    tri_yarn = tmp_path / "t"
    shutil.copytree(golden_dir, tri_yarn)
    config = json.loads((tri_yarn / "config.json").read_text())
    (tri_yarn / "config.json").write_text(json.dumps({**config, **yarn}))
    tri_model = mlx_lm.load(str(tri_yarn))[0]  # tokenizer too: transformers reads rope_scaling
    assert tokenizer.encode("hello")
    assert ar_yarn.args.modes == ("ar",) and ar_yarn.args.rope_scaling == YARN
    ids = golden["ids_a"]
    assert mx.allclose(ar_yarn(ids), tri_model(ids)[..., :VOCAB], rtol=0, atol=1e-6)


# everything that needs MASK refuses, before any work


@pytest.mark.parametrize("mode", ["diffusion", "spec"])
def test_the_runtime_refuses_the_masked_modes(ar, golden, mode):
    model, prompt = ar[0], ids_of(golden, "prompt_p1")
    message = rf"mode '{mode}' {MISSING}.*{REMEDY}"
    with pytest.raises(ValueError, match=message):
        decode(model, prompt, mode=mode, max_tokens=4)  # the call itself, before any step
    with pytest.raises(ValueError, match=message):
        generate_ids(model, prompt, mode=mode, max_tokens=4)
    with pytest.raises(ValueError, match=message):
        generate_batch(model, [prompt, prompt], mode=mode, max_tokens=4)
    engine = Engine(model)
    with pytest.raises(ValueError, match=message):
        engine.add(prompt, *make_request(mode=mode, max_tokens=4))
    assert engine.rows == []


@contextmanager
def serving(load, **config):
    worker = Worker(load).start()
    try:
        settings = ServerConfig("ar_tiny", max_tokens=8, max_context=1024, **config)
        with background_server(create_app(worker, settings)) as url:
            yield url
    finally:
        worker.close()


def test_the_server_lists_the_modes_and_refuses_masked_requests(ar, ar_dir, golden_dir):
    with serving(lambda: mlx_lm.load(str(ar_dir))) as url:
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert models[0]["modes"] == ["ar"]
        request = {"prompt": "Once upon a time", "max_tokens": 8}
        reply = httpx.post(f"{url}/v1/completions", json=request, timeout=60)  # default: ar
        assert reply.status_code == 200, reply.text
        expected = ar[1].decode(generate_ids(ar[0], ar[1].encode("Once upon a time"), max_tokens=8))
        assert reply.json()["choices"][0]["text"] == expected
        for mode in ("diffusion", "spec"):
            for stream in (False, True):
                refused = httpx.post(
                    f"{url}/v1/completions",
                    json={**request, "mode": mode, "stream": stream},
                    timeout=60,
                )
                assert refused.status_code == 400
                error = refused.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert f"mode '{mode}' needs the MASK token" in error["message"]
        health = httpx.get(f"{url}/health").json()
        assert health["requests"]["failed"] == 0 and health["running"] == 0
    with serving(lambda: mlx_lm.load(str(golden_dir))) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["modes"] == [
            "ar",
            "diffusion",
            "spec",
        ]


def no_traceback(result) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("mode", ["diffusion", "spec"])
def test_cli_generate_chat_serve_and_bench_refuse_the_masked_modes(ar_dir, mode):
    base = ["--model", str(ar_dir)]
    for command in (
        ["generate", *base, "--prompt", "Hello", "--mode", mode],
        ["chat", *base, "--mode", mode],
        ["serve", *base, "--mode", mode, "--port", "1"],
        ["bench", *base, "--mode", mode, "--prompt-len", "4", "--max-tokens", "2"],
    ):
        result = runner.invoke(app, command, env={"COLUMNS": "400"})
        no_traceback(result)
        assert "needs the MASK token" in " ".join(result.output.split()), command[0]


def test_cli_reports_the_modes_and_decodes_ar_by_default(ar, ar_dir):
    result = runner.invoke(
        app, ["generate", "--model", str(ar_dir), "--prompt", "Hello", "--max-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    expected = ar[1].decode(generate_ids(ar[0], ar[1].encode("Hello"), max_tokens=6))
    assert result.stdout == expected + "\n"
    assert "modes ar: an AR-only checkpoint, without the MASK token" in result.stderr
    assert "[ar] 6 tokens" in result.stderr
    chat = runner.invoke(
        app, ["chat", "--model", str(ar_dir), "--max-tokens", "2"], input="/mode spec\n/quit\n"
    )
    assert chat.exit_code == 0, chat.output
    assert "in ar mode (modes ar: an AR-only checkpoint" in chat.stdout
    assert "mode 'spec' needs the MASK token" in chat.stderr
    bench = runner.invoke(
        app, ["bench", "--model", str(ar_dir), "--prompt-len", "4", "--max-tokens", "2"]
    )
    assert bench.exit_code == 0, bench.output
    rows = [line for line in bench.stdout.splitlines() if line.startswith("| ckpt")]
    assert [row.split("|")[2].strip() for row in rows] == ["ar"]
    assert "block diffusion at" not in bench.stdout


# training


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("text_data")
    lines = [f"the cat sat on the mat {i % 3}." for i in range(4)]
    for name in ("train", "valid"):
        (folder / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in lines)
        )
    return folder


def test_lora_joint_is_refused_and_ar_trains(ar_dir, text_data, tmp_path):
    result = runner.invoke(
        app,
        ["lora", "--model", str(ar_dir), "--data", str(text_data), "--adapter-path", str(tmp_path)],
        env={"COLUMNS": "400"},
    )
    no_traceback(result)
    output = " ".join(result.output.split())
    assert "the joint objective (diffusion weight 0.3" in output
    assert "needs the MASK token" in output and "--objective ar" in output
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
    config = LoraConfig(
        objective="ar", iters=4, batch_size=2, learning_rate=1e-2, num_layers=-1, rank=4,
        steps_per_report=2, steps_per_eval=4, val_batches=1, spec_prompts=2, spec_tokens=4,
    )  # fmt: skip
    model, history = run_lora(ar_dir, text_data, tmp_path / "a", config, report=lambda e: None)
    validation = [e for e in history if "val_ar_loss" in e]
    assert validation[-1]["val_ar_loss"] < validation[0]["val_ar_loss"]
    assert all(set(e) == {"step", "val_ar_loss"} for e in validation)  # no diffusion, no spec
    assert (tmp_path / "a" / "adapters.safetensors").is_file()


def test_full_training_needs_diffusion_weight_zero(ar_dir, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 40)
    base = ["train", "--data", str(corpus), "--model", str(ar_dir), "--iters", "2"]
    args = [*base, "--batch-size", "2", "--seq-len", "16", "--out", str(tmp_path / "o")]
    refused = runner.invoke(app, args, env={"COLUMNS": "400"})
    no_traceback(refused)
    assert "--diffusion-weight 0" in " ".join(refused.output.split())
    assert not (tmp_path / "o").exists()
    trained = runner.invoke(app, [*args, "--diffusion-weight", "0"])
    assert trained.exit_code == 0, trained.output
    model = mlx_lm.load(str(tmp_path / "o"))[0]
    assert model.args.modes == ("ar",)


# evaluation


def test_eval_diffusion_is_refused_and_divergence_is_ar_only(ar, ar_dir):
    pytest.importorskip("lm_eval")
    task_dir = Path(__file__).parent / "fixtures" / "eval_task"
    command = ["eval", "--model", str(ar_dir), "--tasks", "dhara_mc_local"]
    command += ["--include-path", str(task_dir), "--mode", "diffusion"]
    result = runner.invoke(app, command, env={"COLUMNS": "400", "HF_DATASETS_OFFLINE": "1"})
    no_traceback(result)
    assert "diffusion scoring (eval --mode diffusion) needs the MASK token" in " ".join(
        result.output.split()
    )
    tokens = mx.array([list(range(10, 42)), list(range(50, 82))])
    report = divergence(ar[0], None, tokens)
    assert set(report) == {"ar"} and report["ar"]["mean_kl"] == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="diffusion scoring " + MISSING):
        divergence(ar[0], None, tokens, modes=["ar", "diffusion"])


# conversion


def test_convert_target_bpw_measures_and_reports_ar_only(ar_dir, tmp_path):
    dst = tmp_path / "mixed"
    result = runner.invoke(
        app,
        [
            "convert", "--hf-path", str(ar_dir), "--mlx-path", str(dst), "--target-bpw", "7",
            "--group-size", "32", "--dtype", "bfloat16", "--num-samples", "4", "--seq-len", "64",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "modes ar (AR-only: no MASK token)" in result.output
    report = json.loads((dst / "quantization_report.json").read_text())
    assert report["modes"] == ["ar"] and report["achieved_bpw"] <= 7.0
    assert {b for b in report["modules_per_bits"]} <= {"4", "8"}
    assert set(report["held_out"]["mix"]) == {"ar"} and report["held_out"]["float"]["ar"]
    sens = json.loads((dst / "sensitivities.json").read_text())
    assert all(set(m) == {"kl", "measured", "ar"} for m in sens["modules"].values())
    model, _ = mlx_lm.load(str(dst))
    assert model.args.modes == ("ar",)
    assert len(generate_ids(model, [5, 6, 7], max_tokens=4)) == 4
