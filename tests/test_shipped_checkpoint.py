"""The shipped, JAX-trained checkpoint: its shape, its training record, its output."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.checkpoint import flat_params, load_model
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.tokenizer import Tokenizer

from conftest import SHIPPED

# Not from the training data: written for this test.
PYTHON_SNIPPET = '''def read_lines(path, encoding="utf-8"):
    """Return the lines of a text file without their line endings."""
    with open(path, encoding=encoding) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count
'''


@pytest.fixture(scope="module")
def engine():
    return Engine(SHIPPED, max_num_seqs=4, max_model_len=256, dtype="float32")


def test_architecture_exercises_the_moe_path():
    model = load_model(SHIPPED)
    c = model.config
    assert c.num_experts >= 8 and c.num_experts_per_tok == 2
    assert c.num_shared_experts >= 1 and c.num_moe_layers >= 1
    params = sum(v.size for v in flat_params(model).values())
    assert 1_000_000 <= params <= 10_000_000


def test_checkpoint_fits_the_git_budget():
    files = [os.path.join(root, f) for root, _, names in os.walk(SHIPPED) for f in names]
    assert sum(os.path.getsize(f) for f in files) <= 25 * 2**20


def test_training_record_is_complete():
    record = json.load(open(os.path.join(SHIPPED, "training_log.json")))
    last = record["history"][-1]
    assert last["held_out_loss"] < 4.5 and last["train_loss"] < 4.5
    assert record["train_time_s"] < 3600
    readme = open(os.path.join(SHIPPED, "README.md")).read()
    assert "eaas-jax train" in readme and f"{last['held_out_loss']:.2f}" in readme


def test_it_learned_python():
    """Real Python is far more likely under the model than the same tokens shuffled."""
    model = load_model(SHIPPED)
    ids = Tokenizer(os.path.join(SHIPPED, "tokenizer.json")).encode(PYTHON_SNIPPET)
    shuffled = list(np.random.default_rng(0).permutation(ids))

    def nll(tokens):
        logits = model(jnp.asarray([tokens]))[0, :-1]
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(tokens[1:])[:, None], axis=-1)
        return -float(jnp.mean(logp))

    real, noise = nll(ids), nll(shuffled)
    assert real < 3.0, real
    assert noise > real + 2.0, (real, noise)


def test_greedy_completion_looks_like_python(engine):
    prompt = "def read_file(path):\n    "
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    text = prompt + out.outputs[0].text
    # An indented statement that starts with Python syntax, beyond the prompt.
    assert re.search(r"^ {4,}(if|return|for|while|with|try|self\.\w+ =)\b", text[len(prompt):], re.MULTILINE), text


def test_stop_strings_cut_the_text(engine):
    prompt = "import os\n"
    full = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop = full.text[12:16]
    assert stop and full.text.find(stop) >= 1
    cut = full.text.find(stop)
    for include in (False, True):
        params = SamplingParams(temperature=0, max_tokens=40, stop=[stop, "\x00never"], include_stop_str_in_output=include)
        out = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.text == full.text[: cut + (len(stop) if include else 0)]
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.token_ids == full.token_ids[: len(out.token_ids)]
        assert len(out.token_ids) < len(full.token_ids)
