"""The lm-eval adapter and `dhara-mlx eval --tasks`, offline, on the local multiple-choice task."""

import json
import os
from pathlib import Path

import pytest

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("lm_eval")

import mlx_lm  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from optiq_dhara.cli import app  # noqa: E402
from optiq_dhara.evaluate.harness import DharaLM, cut_at_stop  # noqa: E402
from optiq_dhara.evaluate.scoring import loglikelihoods  # noqa: E402
from optiq_dhara.runtime import generate_ids  # noqa: E402

TASK_DIR = Path(__file__).parent / "fixtures" / "eval_task"


@pytest.fixture(scope="module")
def loaded(golden_dir):
    return mlx_lm.load(str(golden_dir))


def expected_accuracy(model, tokenizer, mode: str) -> float:
    """acc of the local task computed without lm-eval: the likeliest choice per item."""
    items = [json.loads(line) for line in (TASK_DIR / "test.jsonl").read_text().splitlines()]
    lm = DharaLM(model, tokenizer, mode=mode)
    correct = 0
    for item in items:
        context = f"Question: {item['question']}\nAnswer:"
        pairs = [lm._encode_pair(context, " " + choice) for choice in item["choices"]]
        scores = [s for s, _ in loglikelihoods(model, pairs, mode=mode)]
        correct += scores.index(max(scores)) == item["answer"]
    return correct / len(items)


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_local_task_runs_end_to_end_and_writes_results(golden_dir, loaded, tmp_path, mode):
    out = tmp_path / "results.json"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(golden_dir),
            "--tasks",
            "dhara_mc_local",
            "--include-path",
            str(TASK_DIR),
            "--mode",
            mode,
            "--batch-size",
            "8",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())
    assert results["config"]["mode"] == mode
    assert results["n-samples"]["dhara_mc_local"]["effective"] == 40
    acc = results["results"]["dhara_mc_local"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(*loaded, mode))
    assert "dhara_mc_local" in result.output


def test_model_args_string_builds_the_adapter(golden_dir):
    lm = DharaLM.create_from_arg_string(
        f"pretrained={golden_dir},mode=diffusion,block_len=8", {"batch_size": 4, "device": None}
    )
    assert (lm.mode, lm.block_len, lm.batch_size) == ("diffusion", 8, 4)
    with pytest.raises(ValueError, match="pretrained=PATH"):
        DharaLM.create_from_arg_string("mode=ar")


def test_unknown_task_is_a_usage_error(golden_dir):
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(golden_dir),
            "--tasks",
            "no_such_task_xyz",
            "--include-path",
            str(TASK_DIR),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code != 0
    assert "unknown lm-eval task(s) no_such_task_xyz" in result.output


def test_rolling_loglikelihood_is_the_causal_score_after_the_prefix_token(loaded):
    model, tokenizer = loaded
    lm = DharaLM(model, tokenizer, mode="ar")
    text = "The quick brown fox jumps over the lazy dog."
    [total] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    tokens = lm.tok_encode(text)
    [(want, _)] = loglikelihoods(model, [([lm.prefix_token_id], tokens)], mode="ar")
    assert total == pytest.approx(want, abs=1e-4)


def test_rolling_windows_score_every_token_once(loaded):
    model, tokenizer = loaded
    text = "The quick brown fox jumps over the lazy dog. " * 3
    full = DharaLM(model, tokenizer, max_length=512)
    short = DharaLM(model, tokenizer, max_length=8)
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    [whole] = full.loglikelihood_rolling(request)
    [windowed] = short.loglikelihood_rolling(request)
    assert windowed != pytest.approx(whole, abs=1e-3)  # less context per token
    assert windowed < 0 and whole < 0


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_generate_until_decodes_through_the_runtime_and_cuts_at_stop(loaded, mode):
    model, tokenizer = loaded
    lm = DharaLM(model, tokenizer, mode=mode, block_len=8)
    context = "Question: What do bees make?\nAnswer:"
    ids = generate_ids(
        model,
        lm.tok_encode(context),
        mode=mode,
        max_tokens=16,
        stop_ids=[lm.eot_token_id],
        block_len=8,
    )
    full = tokenizer.decode([t for t in ids if t != lm.eot_token_id])
    assert len(full) > 6
    stop = full[3:6]
    requests = [
        Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 16}), 0),
        Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 16}), 1),
    ]
    assert lm.generate_until(requests, disable_tqdm=True) == [full, full[: full.find(stop)]]


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc\n\nQuestion: x", ["Question:", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["zz", ""]) == "abc"
