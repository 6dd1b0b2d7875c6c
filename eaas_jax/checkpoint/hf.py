"""Import of HF model directories: `config.json` + `*.safetensors` (single or
sharded with `model.safetensors.index.json`).

`build_plan` says, for every tensor the architecture must have on disk, which
parameter of this project's model it fills, where, and how (HF linear weights
are [out, in], ours [in, out]; experts are stacked [E, in, out]). Loading then
streams the shards one tensor at a time into per-parameter host buffers and
moves each parameter to its device as soon as its last piece has arrived, so
host memory beyond the final parameters stays near the expert banks still being
assembled. Block-scaled float8 weights (DeepSeek-V3's release) are dequantized
on the way, their `*_scale_inv` read from whichever shard holds them. Missing tensors, unexpected tensors and shape or dtype mismatches
raise `HfCheckpointError` naming the tensor; nothing is skipped silently (the
only tensors skipped are listed in the log: DeepSeek-V3's multi-token-prediction
layers, and an LM head stored beside tied embeddings).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from eaas_jax.checkpoint.hf_config import HfConfigError, HfLayout, convert_config
from eaas_jax.checkpoint.safetensors import SafetensorsError, SafetensorsFile
from eaas_jax.model.config import ModelConfig

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale_inv"  # float8 block scales: "X.weight" -> "X.weight_scale_inv"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FLOAT_KINDS = ("f", "V")  # numpy float kinds; ml_dtypes' bfloat16/float8 report "V"


class HfCheckpointError(ValueError):
    """A HF model directory that cannot be imported."""


def is_hf_directory(directory: str | os.PathLike) -> bool:
    d = os.fspath(directory)
    return os.path.isfile(os.path.join(d, "config.json")) and (
        os.path.isfile(os.path.join(d, INDEX_FILE)) or os.path.isfile(os.path.join(d, SINGLE_FILE))
    )


def read_hf_config(directory: str | os.PathLike) -> tuple[ModelConfig, HfLayout]:
    path = os.path.join(os.fspath(directory), "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise HfCheckpointError(f"{path}: not valid JSON ({e})") from None
    try:
        return convert_config(hf, source=path)
    except HfConfigError as e:
        raise HfCheckpointError(str(e)) from None


def tensor_files(directory: str | os.PathLike) -> dict[str, str]:
    """{tensor name: path of the .safetensors file holding it}."""
    directory = os.fspath(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    if not os.path.isfile(index_path):
        with _open_shard(os.path.join(directory, SINGLE_FILE)) as f:
            return {name: f.path for name in f.tensors}
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HfCheckpointError(f"{index_path}: malformed index ({e})") from None
    files = {}
    for name, file in weight_map.items():
        path = os.path.join(directory, str(file))
        if os.path.dirname(os.path.abspath(path)) != os.path.abspath(directory):
            raise HfCheckpointError(f"{index_path}: shard {file!r} of {name} is outside the directory")
        if not os.path.isfile(path):
            raise HfCheckpointError(f"{index_path}: shard {file} (holding {name}) does not exist")
        files[name] = path
    return files


def _open_shard(path: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except SafetensorsError as e:
        raise HfCheckpointError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one parameter filled from one HF tensor: `param[index] = transform(tensor)`."""

    param: str
    index: tuple = ()
    transform: Callable[[np.ndarray], np.ndarray] = lambda a: a


@dataclasses.dataclass
class _Tensor:
    shape: tuple[int, ...]  # expected on disk
    pieces: list[Piece]


def _rotary_rows_to_rotate_half(rows: int, rope: int) -> np.ndarray:
    """Row order moving each trailing `rope`-row block from interleaved pairs to
    rotate-half layout: [..., 0, 2, 4, ..., 1, 3, 5, ...]."""
    order = np.arange(rows)
    order[rows - rope:] = rows - rope + np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])
    return order


class _Planner:
    def __init__(self, config: ModelConfig, layout: HfLayout, names: set[str], params: dict):
        self.config, self.layout, self.names, self.params = config, layout, names, params
        self.plan: dict[str, _Tensor] = {}

    def _add(self, hf_name: str, shape, piece: Piece):
        entry = self.plan.setdefault(hf_name, _Tensor(tuple(shape), []))
        entry.pieces.append(piece)

    def same(self, hf_name, param):
        self._add(hf_name, self.params[param].shape, Piece(param))

    def linear(self, hf_prefix, param_prefix, *, bias=False, row_order=None):
        """An nn.Linear: weight [out, in] -> kernel [in, out] (rows reordered first if asked)."""
        kernel = self.params[f"{param_prefix}.kernel"].shape

        def transform(a, order=row_order):
            return (a if order is None else a[order]).T

        self._add(f"{hf_prefix}.weight", kernel[::-1], Piece(f"{param_prefix}.kernel", (), transform))
        if bias:
            self.same(f"{hf_prefix}.bias", f"{param_prefix}.bias")

    def build(self) -> dict[str, _Tensor]:
        c = self.config
        self.same("model.embed_tokens.weight", "client.embed_tokens.embedding")
        self.same("model.norm.weight", "client.norm.weight")
        if not c.tie_word_embeddings:
            self.linear("lm_head", "client.lm_head")
        moe_layer = 0
        for i in range(c.num_layers):
            hf, ours = f"model.layers.{i}", f"client.layers.{i}"
            self.same(f"{hf}.input_layernorm.weight", f"{ours}.input_layernorm.weight")
            self.same(f"{hf}.post_attention_layernorm.weight", f"{ours}.post_attention_layernorm.weight")
            if c.attention == "mla":
                self.latent_attention(f"{hf}.self_attn", f"{ours}.self_attn")
            else:
                self.attention(f"{hf}.self_attn", f"{ours}.self_attn")
            if c.is_moe_layer(i):
                self.moe(hf, ours, moe_layer)
                moe_layer += 1
            else:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    self.linear(f"{hf}.mlp.{proj}", f"{ours}.mlp.{proj}")
        return self.plan

    def attention(self, hf, ours):
        c = self.config
        for proj in ("q_proj", "k_proj", "v_proj"):
            self.linear(f"{hf}.{proj}", f"{ours}.{proj}", bias=c.attention_bias)
        self.linear(f"{hf}.o_proj", f"{ours}.o_proj")
        if c.qk_norm:
            self.same(f"{hf}.q_norm.weight", f"{ours}.q_norm.weight")
            self.same(f"{hf}.k_norm.weight", f"{ours}.k_norm.weight")

    def latent_attention(self, hf, ours):
        c = self.config
        q_order = kv_order = None
        if self.layout.rope_interleaved:
            per_head = _rotary_rows_to_rotate_half(c.head_dim, c.qk_rope_head_dim)
            q_order = (np.arange(c.num_heads)[:, None] * c.head_dim + per_head).reshape(-1)
            kv_order = _rotary_rows_to_rotate_half(c.kv_lora_rank + c.qk_rope_head_dim, c.qk_rope_head_dim)
        if c.q_lora_rank:
            self.linear(f"{hf}.q_a_proj", f"{ours}.q_a_proj")
            self.same(f"{hf}.q_a_layernorm.weight", f"{ours}.q_a_layernorm.weight")
            self.linear(f"{hf}.q_b_proj", f"{ours}.q_b_proj", row_order=q_order)
        else:
            self.linear(f"{hf}.q_proj", f"{ours}.q_proj", row_order=q_order)
        self.linear(f"{hf}.kv_a_proj_with_mqa", f"{ours}.kv_a_proj_with_mqa", row_order=kv_order)
        self.same(f"{hf}.kv_a_layernorm.weight", f"{ours}.kv_a_layernorm.weight")
        self.linear(f"{hf}.kv_b_proj", f"{ours}.kv_b_proj")
        self.linear(f"{hf}.o_proj", f"{ours}.o_proj")

    def moe(self, hf_layer, ours, moe_layer):
        c, layout = self.config, self.layout
        module = next(
            (m for m in layout.moe_modules if f"{hf_layer}.{m}.gate.weight" in self.names),
            layout.moe_modules[0],
        )
        hf = f"{hf_layer}.{module}"
        self.linear(f"{hf}.gate", f"{ours}.router.gate")
        if c.router_score_bias:
            self.same(f"{hf}.gate.e_score_correction_bias", f"{ours}.router.score_bias")
        if c.num_shared_experts:
            shared = f"{hf}.{layout.shared_expert_module}"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                self.linear(f"{shared}.{proj}", f"{ours}.shared_expert.mlp.{proj}")
            if c.shared_expert_gate:
                self.linear(f"{hf}.shared_expert_gate", f"{ours}.shared_expert.gate")
        bank = f"experts.banks.{moe_layer}"
        num_experts, dim, width = self.params[f"{bank}.gate_proj"].shape
        if f"{hf}.experts.gate_up_proj" in self.names:
            # Fused layout: gate_up_proj [E, 2f, d] (gate rows first), down_proj [E, d, f].
            swap = lambda a: a.transpose(0, 2, 1)  # noqa: E731
            self._add(f"{hf}.experts.gate_up_proj", (num_experts, 2 * width, dim),
                      Piece(f"{bank}.gate_proj", (), lambda a: swap(a[:, :width])))
            self._add(f"{hf}.experts.gate_up_proj", (num_experts, 2 * width, dim),
                      Piece(f"{bank}.up_proj", (), lambda a: swap(a[:, width:])))
            self._add(f"{hf}.experts.down_proj", (num_experts, dim, width),
                      Piece(f"{bank}.down_proj", (), swap))
            return
        for expert in range(num_experts):
            for name, ours_proj in zip(layout.expert_projections, ("gate_proj", "up_proj", "down_proj")):
                shape = (width, dim) if ours_proj != "down_proj" else (dim, width)
                self._add(f"{hf}.experts.{expert}.{name}.weight", shape,
                          Piece(f"{bank}.{ours_proj}", (expert,), np.transpose))


def build_plan(config: ModelConfig, layout: HfLayout, names, params: dict) -> dict[str, _Tensor]:
    """{HF tensor name: expected shape and the parameter pieces it fills}."""
    return _Planner(config, layout, set(names), params).build()


def _is_scale_of_planned(name: str, plan: dict, layout: HfLayout) -> bool:
    return (layout.fp8_block is not None and name.endswith(SCALE_SUFFIX)
            and name[: -len(SCALE_SUFFIX)] in plan)


def _skippable(name: str, config: ModelConfig, layout: HfLayout) -> bool:
    """Tensors that exist on disk but are deliberately not served."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    if layout.num_mtp_layers and name.startswith("model.layers."):
        return int(name.split(".")[2]) >= config.num_layers
    return False


def check_tensor_names(plan: dict, files: dict, config: ModelConfig, layout: HfLayout, where: str):
    missing = sorted(set(plan) - set(files))
    unplanned = sorted(n for n in set(files) - set(plan) if not _is_scale_of_planned(n, plan, layout))
    extra = [n for n in unplanned if not _skippable(n, config, layout)]
    if missing or extra:
        parts = []
        for what, names in (("missing", missing), ("unexpected", extra)):
            if names:
                more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
                parts.append(f"{what} tensors {names[:8]}{more}")
        raise HfCheckpointError(f"{where} ({layout.architecture}): " + "; ".join(parts))
    if unplanned:
        logger.info("%s: not loading %d tensors not used for serving (%s, ...)", where, len(unplanned), unplanned[0])


def load_hf_params(
    directory: str | os.PathLike,
    config: ModelConfig,
    layout: HfLayout,
    expected: dict,
    wanted: set[str],
    *,
    dtype=jnp.float32,
    device: jax.Device | None = None,
) -> dict[str, jax.Array]:
    """Reads the parameters named in `wanted` (dotted names of `expected`,
    the abstract model's {name: shape}) from a HF directory, in `dtype` on `device`."""
    directory = os.path.abspath(os.fspath(directory))
    files = tensor_files(directory)
    plan = build_plan(config, layout, files, expected)
    check_tensor_names(plan, files, config, layout, directory)
    by_file: dict[str, list[str]] = collections.defaultdict(list)
    remaining: collections.Counter = collections.Counter()
    for name, tensor in plan.items():
        pieces = [p for p in tensor.pieces if p.param in wanted]
        if pieces:
            by_file[files[name]].append(name)
            remaining.update(p.param for p in pieces)
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    host_dtype = np.dtype(jnp.dtype(dtype))
    buffers: dict[str, np.ndarray] = {}
    loaded: dict[str, jax.Array] = {}
    opened: dict[str, SafetensorsFile] = {}

    def shard_of(name: str) -> SafetensorsFile:
        path = files[name]
        if path not in opened:
            opened[path] = _open_shard(path)
        return opened[path]

    shards = sorted(by_file)
    try:
        for path in tqdm(shards, desc="loading shards", unit="shard", disable=len(shards) < 2):
            for name in by_file[path]:
                array = _read_checked(shard_of(name), name, plan[name].shape)
                if array.dtype.itemsize == 1:
                    array = _dequantize(array, name, files, shard_of, layout.fp8_block)
                for piece in plan[name].pieces:
                    if piece.param not in wanted:
                        continue
                    buffer = buffers.get(piece.param)
                    if buffer is None:
                        buffer = buffers[piece.param] = np.empty(expected[piece.param].shape, host_dtype)
                    buffer[piece.index] = piece.transform(array)
                    remaining[piece.param] -= 1
                    if remaining[piece.param] == 0:
                        loaded[piece.param] = jax.device_put(buffers.pop(piece.param), sharding)
                del array
            # A shard (or one opened for a float8 scale) is reopened if needed again.
            while opened:
                opened.popitem()[1].close()
    finally:
        for shard in opened.values():
            shard.close()
    return loaded


def _dequantize(array, name, files, shard_of, block) -> np.ndarray:
    """A float8 weight times its per-block scales, in float32."""
    scale_name = name + SCALE_SUFFIX
    if block is None or scale_name not in files:
        raise HfCheckpointError(
            f"tensor {name} is float8 ({array.dtype.name}) without block scales "
            f"({scale_name} and a quantization_config)"
        )
    rows, cols = array.shape
    blocks = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    scale = _read_checked(shard_of(scale_name), scale_name, blocks).astype(np.float32)
    full = np.repeat(np.repeat(scale, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return array.astype(np.float32) * full


def _read_checked(shard: SafetensorsFile, name: str, shape: tuple) -> np.ndarray:
    info = shard.tensors.get(name)
    if info is None:
        raise HfCheckpointError(f"{shard.path}: tensor {name} is listed in the index but not in the file")
    fp8 = info.dtype.itemsize == 1 and info.dtype.kind == "V" and len(shape) == 2
    if info.dtype.kind not in _FLOAT_KINDS or (info.dtype.itemsize < 2 and not fp8):
        raise HfCheckpointError(
            f"{shard.path}: tensor {name} has dtype {info.dtype.name}; expected a floating-point "
            "type (float32, float16, bfloat16, or block-scaled float8 for 2-D weights)"
        )
    if info.shape != shape:
        raise HfCheckpointError(
            f"{shard.path}: tensor {name} has shape {info.shape}, expected {shape}"
        )
    return shard.read(name)
