"""The `eaas-jax` command: generate (one prompt, JSONL batch) and train."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

from eaas_jax.checkpoint import load_model
from eaas_jax.cli import main
from eaas_jax.engine import Engine, ExpertServerError
from eaas_jax.model import ModelConfig

from conftest import REPO, replace_config


def test_generate_one_prompt_prints_prompt_and_completion(tiny_checkpoint, capsys):
    """Also: --warmup (off by default for one prompt) and --decode-window
    change nothing printed; a bad window is one error line."""
    outs = []
    for options in (["--no-warmup"], ["--warmup"], ["--decode-window", "3"]):
        assert main(["generate", "--model", tiny_checkpoint, "--prompt", "def f(x):", "--max-tokens", "5",
                     "--max-model-len", "64", "--max-num-seqs", "2", "--temperature", "0", *options]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0].startswith("def f(x):") and len(outs[0].strip()) > len("def f(x):")
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert main(["generate", "--model", tiny_checkpoint, "--prompt", "x", "--decode-window", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "decode_window" in err and "Traceback" not in err


def test_generate_batch_from_jsonl(tiny_checkpoint, tmp_path, capsys):
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(
        json.dumps({"prompt": "import os", "max_tokens": 3}) + "\n"
        + json.dumps("class A:") + "\n\n"
        + json.dumps({"prompt": [5, 6, 7], "temperature": 0.8, "seed": 1, "n": 2}) + "\n"
    )
    assert main(["generate", "--model", tiny_checkpoint, "--input", str(inp), "--output", str(outp),
                 "--max-tokens", "4", "--max-model-len", "64", "--max-num-seqs", "4"]) == 0
    rows = [json.loads(line) for line in outp.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["import os", "class A:", None]
    assert [len(r["outputs"][0]["token_ids"]) for r in rows][:2] == [3, 4]
    assert len(rows[2]["outputs"]) == 2 and rows[2]["prompt_token_ids"] == [5, 6, 7]
    assert "generated tok/s" in capsys.readouterr().err


def test_a_batch_with_failed_requests_writes_every_line_then_exits_with_the_error(tiny_checkpoint, tmp_path,
                                                                                 monkeypatch, capsys):
    # What Engine.generate raises when expert servers failed some requests
    # (tests/test_failover.py): every output, the failed ones marked.
    generate = Engine.generate

    def generate_failing_the_second(self, *args, **kwargs):
        outputs = generate(self, *args, **kwargs)
        outputs[1].error = "expert server 'solo' did not reply"
        outputs[1].outputs[0].finish_reason = "error"
        raise ExpertServerError("1 of 2 requests failed", outputs)

    monkeypatch.setattr(Engine, "generate", generate_failing_the_second)
    inp, outp = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps("import os") + "\n" + json.dumps("class A:") + "\n")
    assert main(["generate", "--model", tiny_checkpoint, "--input", str(inp), "--output", str(outp),
                 "--max-tokens", "3", "--max-model-len", "64", "--max-num-seqs", "2"]) == 2
    assert re.search("error: 1 of 2 requests failed", capsys.readouterr().err)
    first, second = [json.loads(line) for line in outp.read_text().splitlines()]
    assert "error" not in first and len(first["outputs"][0]["token_ids"]) == 3
    assert second["error"] == "expert server 'solo' did not reply"
    assert second["outputs"][0]["finish_reason"] == "error"


@pytest.mark.parametrize(
    "line, message",
    [("{broken", "not valid JSON"), ('{"text": "x"}', "'prompt'"), ('{"prompt": "x", "top_p": 7}', "top_p"),
     ('{"prompt": "x", "colour": 1}', "unknown field")],
)
def test_generate_rejects_bad_jsonl_lines_with_their_line_number(tiny_checkpoint, tmp_path, line, message, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text('"fine"\n' + line + "\n")
    assert main(["generate", "--model", tiny_checkpoint, "--input", str(inp)]) == 2
    assert re.search(rf"in\.jsonl:2: .*{message}", capsys.readouterr().err)


def test_generate_rejects_bad_sampling_flags(tiny_checkpoint, capsys):
    assert main(["generate", "--model", tiny_checkpoint, "--prompt", "x", "--temperature", "-1"]) == 2
    assert re.search("temperature", capsys.readouterr().err)


def test_generate_reports_an_unreachable_registry_as_an_error(tiny_checkpoint, capsys):
    deployment = os.path.join(REPO, "configs", "deploy", "tiny-moe-2-servers.toml")
    assert main(["generate", "--model", tiny_checkpoint, "--prompt", "x", "--deployment", deployment,
                 "--registry", "etcd://127.0.0.1:1"]) == 2
    assert re.search(r"^error: cannot reach etcd at etcd://127.0.0.1:1", capsys.readouterr().err)


def test_train_writes_a_loadable_checkpoint_and_learns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py"):
        shutil.copy(os.path.join(stdlib, name), data / name)
    config = replace_config(vocab_size=320, eos_token_id=None, max_position_embeddings=128)
    config_path = tmp_path / "config.json"
    config.save(config_path)
    out = tmp_path / "ckpt"
    assert main(["train", "--config", str(config_path), "--out", str(out), "--steps", "30",
                 "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--eval-every", "15",
                 "--data-root", str(data)]) == 0
    log = json.loads((out / "training_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [15, 30]
    first, last = log["history"]
    assert last["train_loss"] < first["train_loss"] < math.log(320)  # it learned something
    assert last["held_out_loss"] < first["held_out_loss"]
    model = load_model(out)
    assert model.config.eos_token_id == 0  # the tokenizer's end-of-text token
    assert (out / "tokenizer.json").exists()
    assert ModelConfig.load(out / "config.json").vocab_size == 320


def test_errors_are_one_line_and_exit_code_2_with_the_traceback_only_under_debug(capsys):
    assert main(["generate", "--model", "/nonexistent-checkpoint", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "/nonexistent-checkpoint" in err
    with pytest.raises(Exception, match="nonexistent-checkpoint"):
        main(["generate", "--model", "/nonexistent-checkpoint", "--prompt", "x", "--debug"])


def test_version_help_defaults_and_verbose_after_the_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("eaas-jax ")
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    shown = capsys.readouterr().out
    assert re.search(r"in\s+flight\s+at\s+most\s+\(default:\s+32\)", shown)  # --max-num-seqs
    assert re.search(r"unset:\s+the\s+checkpoint's\s+generation_config.json", shown)  # the sampling flags
    # -v and --debug after the subcommand parse: the run gets as far as reading its input.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        # -v logs at INFO though absl (imported with orbax) installed a root handler first
        absl_like = logging.StreamHandler()
        root.addHandler(absl_like)
        assert main(["batch", "--model", "m", "--input", "/nonexistent.jsonl", "--output", "o", "-v",
                     "--debug"]) == 2
        assert root.level == logging.INFO and absl_like not in root.handlers
        # pytest's handlers stay; plain stream handlers (basicConfig's, an earlier run's) are replaced
        assert [h for h in handlers if not isinstance(h, logging.StreamHandler) or h.__module__.startswith("_pytest")] \
            == [h for h in root.handlers if not isinstance(h, logging.StreamHandler) or h.__module__.startswith("_pytest")]
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers
    assert "cannot read /nonexistent.jsonl" in capsys.readouterr().err


_TWO_RUNS = """
import json, sys
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None)
from eaas_jax.cli import main
args = ["generate", "--model", sys.argv[1], "--prompt", "def f(x):", "--max-tokens", "4", "--temperature", "0",
        "--max-model-len", "64", "--max-num-seqs", "2", "--compile-cache", sys.argv[2]]
counts = []
for _ in range(2):
    assert main(args) == 0
    counts.append(len(hits))
print(json.dumps(counts))
"""


def test_a_second_run_loads_its_programs_from_the_compile_cache(tiny_checkpoint, tmp_path):
    """The first run writes its compiled programs to --compile-cache; the
    next (a new engine: new jit objects) finds them there instead of
    compiling. Each run prints the same completion."""
    cache = tmp_path / "xla"
    run = subprocess.run([sys.executable, "-c", _TWO_RUNS, tiny_checkpoint, str(cache)], capture_output=True,
                         text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = json.loads(run.stdout.strip().splitlines()[-1])
    assert first == 0 and second > first, (first, second)
    assert any(cache.iterdir())
    completions = [line for line in run.stdout.splitlines()[:-1] if line.startswith("def f(x):")]
    assert len(completions) == 2 and completions[0] == completions[1]


def test_a_compile_cache_others_can_write_is_not_used(tmp_path, caplog, monkeypatch):
    from eaas_jax import compile_cache

    monkeypatch.setenv(compile_cache.ENV_VAR, "unchanged")  # restored after the test

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with caplog.at_level("WARNING"):
        assert compile_cache.enable(str(shared)) is None
    assert "writable by others (mode 777)" in caplog.text
    assert os.environ[compile_cache.ENV_VAR] == "unchanged"  # a refused directory is not handed on
    assert compile_cache.enable("off") is None and os.environ[compile_cache.ENV_VAR] == "off"
