"""Shared fixtures: tiny random checkpoints and engines built once per session.

Compiling a model step costs seconds on CI's two cores, so engines are shared
between tests (session scope) and the test models are tiny.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os

# Two CPU devices for the expert-parallel engine's tests (one-device code uses
# the first); read when JAX creates its CPU backend, so set before any use.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=2"]
).strip()

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from eaas_jax.checkpoint import save_checkpoint
from eaas_jax.model import ModelConfig, MoeTransformer

# The numerics tests compare float32 results tightly; on GPUs XLA would
# otherwise run float32 matmuls in TF32.
jax.config.update("jax_default_matmul_precision", "highest")

# XLA compilations in this process, by jitted function ("jit(_step)" is a model
# step): what tests compare an engine's own count of step programs with.
XLA_COMPILATIONS: collections.Counter = collections.Counter()
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: XLA_COMPILATIONS.update([kwargs.get("fun_name")])
    if event == "/jax/core/compile/backend_compile_duration" else None
)


@contextlib.contextmanager
def compiles_once_per_step_shape(engine):
    """Fails if the code inside compiled model steps more often than `engine`
    met new step shapes: jit keys its cache on more than shapes (whether an
    input is committed to a device), and a second compile of a shape is a
    stall in the middle of serving. Only for code where no other engine runs."""
    xla, shapes = XLA_COMPILATIONS["jit(_step)"], engine.num_compilations
    yield
    assert XLA_COMPILATIONS["jit(_step)"] - xla == engine.num_compilations - shapes


def triton_kernels_lowered_for_cuda(fn, *args, donate_argnums=()) -> list[str]:
    """The Triton kernels (Pallas' GPU custom calls, one StableHLO line each)
    of `fn` lowered for CUDA here, with no GPU: Pallas lowers a kernel to
    Triton's IR when the program is lowered, so a kernel Pallas cannot lower
    (a block of a shape Triton does not take, say) fails here, in CI, not at
    the GPU's compile. `args` may be jax.ShapeDtypeStructs: nothing is
    allocated. What Triton and XLA then compile runs only on a GPU (gpu_tests)."""
    lowered = jax.jit(fn, donate_argnums=donate_argnums).trace(*args).lower(lowering_platforms=("cuda",))
    return [line for line in lowered.as_text().splitlines() if "custom_call @__gpu$xla.gpu.triton" in line]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "checkpoints", "tiny-moe")

# Every architectural option on: GQA, q/k norm, shared expert with gate, a dense
# first layer, untied embeddings.
TINY_CONFIG = ModelConfig(
    vocab_size=4096,  # the shipped tokenizer's, so text prompts work
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    norm_topk_prob=True,
    num_shared_experts=1,
    shared_expert_intermediate_size=24,
    shared_expert_gate=True,
    first_k_dense=1,
    qk_norm=True,
    attention_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=256,
    eos_token_id=0,
)


def tiny_model(config: ModelConfig = TINY_CONFIG, seed: int = 0, dtype=jnp.float32) -> MoeTransformer:
    """A randomly initialised model (deterministic for a seed)."""
    return MoeTransformer(config, dtype=dtype, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A random TINY_CONFIG checkpoint with the shipped tokenizer."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny-random")
    tokenizer = os.path.join(SHIPPED, "tokenizer.json")
    save_checkpoint(path, tiny_model(), tokenizer_file=tokenizer if os.path.exists(tokenizer) else None)
    return path


@pytest.fixture
def fresh_expert_traces():
    """A test that watches the routed experts being traced (or patches what
    the trace calls) starts and ends with no trace of them kept: their jit's
    cache is the process's, so another test's trace of the same shapes would
    be reused instead, and this test's patched one reused after it."""
    from eaas_jax.model import moe

    moe._routed_experts.clear_cache()
    yield
    moe._routed_experts.clear_cache()


@pytest.fixture
def kernel_switch(monkeypatch):
    """Sets a kernel switch (`kernels.common.kernel_switched_on`'s variable:
    'kernel' or 'xla', or a bad value) for one test: the environment and the
    cached reading of it, which starts and ends the test empty (a process
    reads a switch once)."""
    from eaas_jax.kernels.common import kernel_switched_on

    def switch(variable: str, value: str) -> None:
        monkeypatch.setenv(variable, value)
        kernel_switched_on.cache_clear()

    kernel_switched_on.cache_clear()
    yield switch
    kernel_switched_on.cache_clear()


@pytest.fixture(scope="session")
def tiny_engine(tiny_checkpoint):
    from eaas_jax.engine import Engine

    # One-token steps (not the default's windows): the reference that
    # tests/test_decode_window.py's windows are compared against.
    return Engine(tiny_checkpoint, max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4,
                  decode_window=1)


def replace_config(**changes) -> ModelConfig:
    return dataclasses.replace(TINY_CONFIG, **changes)


class OtherUser:
    """A second, unprivileged uid on this machine: how tests play a hostile
    local user. Its code is stdlib-only Python run by the system interpreter
    (the test's virtual environment may sit where that uid cannot read)."""

    NAME = "eaas-hostile"
    PYTHON = "/usr/bin/python3"

    def __init__(self, uid: int, gid: int):
        self.uid, self.gid = uid, gid

    def command(self, code: str, *args: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                self.PYTHON, "-c", code, *map(str, args)]

    def run(self, code: str, *args: str, timeout: float = 60.0):
        """Runs `code` as this user; the CompletedProcess (text output)."""
        import subprocess

        return subprocess.run(self.command(code, *args), capture_output=True, text=True, timeout=timeout)

    def popen(self, code: str, *args: str, **kwargs):
        import subprocess

        return subprocess.Popen(self.command(code, *args), **kwargs)


@pytest.fixture(scope="session")
def other_user() -> OtherUser:
    """A second uid, created here when missing (needs root, `useradd` and
    `setpriv`, as in CI); skips cleanly where that is impossible."""
    import pwd
    import shutil
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("playing another local user needs root (to create the user and switch to it)")
    if not (shutil.which("setpriv") and os.path.exists(OtherUser.PYTHON)):
        pytest.skip("needs setpriv and /usr/bin/python3 to run code as another user")
    try:
        entry = pwd.getpwnam(OtherUser.NAME)
    except KeyError:
        if not shutil.which("useradd"):
            pytest.skip("needs useradd to create a second user")
        made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                               OtherUser.NAME], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"could not create user {OtherUser.NAME}: {made.stderr.strip()}")
        entry = pwd.getpwnam(OtherUser.NAME)
    user = OtherUser(entry.pw_uid, entry.pw_gid)
    probe = user.run("import os; print(os.geteuid())")
    if probe.returncode != 0 or probe.stdout.strip() != str(entry.pw_uid):
        pytest.skip(f"cannot run code as {OtherUser.NAME}: {probe.stderr.strip()}")
    return user
