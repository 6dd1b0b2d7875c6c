"""A small optax trainer for the project's MoE transformer.

It exists to produce real checkpoints (the shipped `checkpoints/tiny-moe`) with
the same model code the engine serves: next-token cross-entropy plus the router
load-balancing loss, AdamW with warmup and cosine decay, gradient clipping.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from eaas_jax.checkpoint.directory import TOKENIZER_FILE, save_checkpoint
from eaas_jax.model.config import ModelConfig
from eaas_jax.model.transformer import MoeTransformer, load_balancing_loss
from eaas_jax.train import data

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainSettings:
    steps: int = 800
    batch_size: int = 16
    seq_len: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 200
    eval_windows: int = 64
    data_root: str | None = None  # default: this interpreter's stdlib
    max_data_bytes: int = 64 << 20


def _loss(model: MoeTransformer, tokens: jax.Array):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    hidden, _, routings = model.hidden_states(inputs, positions)
    logits = model.client.logits(hidden)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    aux = load_balancing_loss(routings, model.config.num_experts) if routings else 0.0
    return ce + model.config.router_aux_loss_coef * aux, ce


@nnx.jit
def _train_step(model, optimizer, tokens):
    (_, ce), grads = nnx.value_and_grad(_loss, has_aux=True)(model, tokens)
    optimizer.update(model, grads)
    return ce


@nnx.jit
def _eval_step(model, tokens):
    return _loss(model, tokens)[1]


def _evaluate(model, stream: np.ndarray, settings: TrainSettings) -> float:
    rng = np.random.default_rng(1234)  # the same windows at every evaluation
    windows = data.sample_windows(stream, settings.eval_windows, settings.seq_len + 1, rng)
    losses = [
        float(_eval_step(model, jnp.asarray(windows[i : i + settings.batch_size])))
        for i in range(0, len(windows), settings.batch_size)
    ]
    return float(np.mean(losses))


def train(config: ModelConfig, out_dir: str, settings: TrainSettings) -> dict:
    """Trains a tokenizer and a model on the stdlib corpus; writes a checkpoint
    directory (config, params, tokenizer, training_log.json) to `out_dir`."""
    start = time.time()
    corpus = data.stdlib_corpus(settings.data_root, settings.max_data_bytes)
    log.info(
        "corpus: %d train files, %d held-out files under %s",
        len(corpus.train_files), len(corpus.held_out_files), corpus.root,
    )
    train_texts = data.read_texts(corpus.train_files)
    tokenizer = data.train_tokenizer(train_texts, config.vocab_size)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise ValueError(
            f"the tokenizer reached {tokenizer.get_vocab_size()} tokens, not the config's "
            f"vocab_size={config.vocab_size}: use more data or a smaller vocab_size"
        )
    eos = tokenizer.token_to_id(data.EOS_TOKEN)
    config = dataclasses.replace(config, eos_token_id=eos, bos_token_id=eos)
    train_stream = data.encode_stream(tokenizer, train_texts)
    held_out_stream = data.encode_stream(tokenizer, data.read_texts(corpus.held_out_files))
    log.info("tokens: %d train, %d held-out", len(train_stream), len(held_out_stream))

    model = MoeTransformer(config, dtype=jnp.float32, rngs=nnx.Rngs(settings.seed))
    warmup = min(settings.warmup_steps, settings.steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, settings.learning_rate, warmup, max(settings.steps, warmup + 1), settings.learning_rate * 0.05
    )
    optimizer = nnx.Optimizer(
        model,
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b2=0.95, weight_decay=settings.weight_decay),
        ),
        wrt=nnx.Param,
    )
    rng = np.random.default_rng(settings.seed)
    history, recent = [], []
    bar = tqdm(range(1, settings.steps + 1), desc="train", unit="step")
    for step in bar:
        batch = data.sample_windows(train_stream, settings.batch_size, settings.seq_len + 1, rng)
        recent.append(float(_train_step(model, optimizer, jnp.asarray(batch))))
        recent = recent[-50:]
        bar.set_postfix(loss=f"{np.mean(recent):.3f}")
        if step % settings.eval_every == 0 or step == settings.steps:
            held_out = _evaluate(model, held_out_stream, settings)
            history.append(
                {"step": step, "train_loss": float(np.mean(recent)), "held_out_loss": held_out,
                 "elapsed_s": round(time.time() - start, 1)}
            )
            log.info("step %d: train loss %.3f, held-out loss %.3f", step, np.mean(recent), held_out)

    with tempfile.TemporaryDirectory() as tmp:
        tok_file = os.path.join(tmp, TOKENIZER_FILE)
        tokenizer.save(tok_file)
        save_checkpoint(out_dir, model, tokenizer_file=tok_file)
    record = {
        "command": " ".join(["eaas-jax"] + sys.argv[1:]),
        "settings": dataclasses.asdict(settings),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "data": {
            "root": corpus.root,
            "train_files": len(corpus.train_files),
            "held_out_files": len(corpus.held_out_files),
            "train_tokens": int(len(train_stream)),
            "held_out_tokens": int(len(held_out_stream)),
        },
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "history": history,
        "train_time_s": round(time.time() - start, 1),
    }
    with open(os.path.join(out_dir, "training_log.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    return record
