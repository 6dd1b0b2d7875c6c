"""`Engine`: load a checkpoint, accept requests, run continuous batching."""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from eaas_jax.checkpoint.directory import load_client, load_config, load_model
from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.chat_template import check_messages
from eaas_jax.engine.expert_parallel import ExpertParallelExperts, expert_mesh
from eaas_jax.engine.generation_config import GenerationDefaults
from eaas_jax.engine.metrics import ServingMetrics
from eaas_jax.engine.outputs import RequestOutput
from eaas_jax.engine.runner import DispatchedStep, EmbeddedExperts, ModelRunner, StepRows
from eaas_jax.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from eaas_jax.engine.scheduler import Scheduler
from eaas_jax.engine.sequence import Request, Sequence
from eaas_jax.engine.tokenizer import Tokenizer
from eaas_jax.model.attention import kv_cache_bytes_per_token
from eaas_jax.control_plane.admission import AdmissionProbes
from eaas_jax.attention_client.remote_backend import (ExpertServerError, RemoteExpertBackend, failed_servers, transport_anomalies,
                                     unserved_error)
from eaas_jax.control_plane.cluster import LocalCluster, RegistryCluster
from eaas_jax.control_plane.deployment import Deployment
from eaas_jax.control_plane.probation import Probation
from eaas_jax.control_plane.registry import RegistryError

log = logging.getLogger(__name__)

# How often, at most, a step boundary asks the cluster which servers are up.
MEMBERSHIP_CHECK_S = 1.0
# A server marked dead by a failed exchange that is still up (the same
# process) is probed again after PROBATION_S, doubled per failure in a row
# (a missed probe included) up to PROBATION_MAX_S (`runtime.probation`), and
# gets its traffic back once it answers (`runtime.admission`).
PROBATION_S = 5.0
PROBATION_MAX_S = 60.0

Prompt = str | Seq[int]

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


class _StepRunAgain(Exception):
    """A step's tokens are dropped and its positions run again (nothing is
    wrong with the request)."""


def _abbreviated(indices: list[int], shown: int = 8) -> str:
    """"0, 3, 5" or "0, 1, ..., 7 and 4 more" for an error message."""
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


def _server_labels(deployment: Deployment) -> list[str]:
    """Metric labels of the server endpoints: the file's names, then one per
    spare endpoint until a server joins there (`_place_joined_server`)."""
    return [s.name for s in deployment.servers] + [f"spare-{e}" for e in deployment.spare_range]


def resolve_dtype(dtype) -> jnp.dtype:
    """'auto' is bfloat16 on accelerators and float32 on the CPU."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
    return dtype


class Engine:
    """Offline and step-wise generation from a checkpoint directory.

    Args:
      model_path: a checkpoint directory: this project's (config.json, params/)
        or a HF model directory (config.json, *.safetensors); either may hold
        tokenizer, chat template and generation config files.
      max_num_seqs: most sequences decoded together in one step.
      max_model_len: context limit (prompt + completion); default the model's
        max_position_embeddings.
      dtype: 'auto', 'float32' or 'bfloat16'.
      seed: seeds the sampling of requests that do not set their own seed.
      block_size: tokens per KV cache block.
      num_kv_blocks: KV cache blocks in the pool; default enough for
        `max_num_seqs` full-length sequences, capped by `kv_cache_bytes`.
      max_num_batched_tokens: prompt tokens prefilled together in one step.
      deployment: None to compute the experts in the engine's own graph; a
        deployment TOML (`configs/deploy/`) to run them in expert servers, which
        the engine starts itself (or finds in `registry`); or a running
        `LocalCluster`/`RegistryCluster` to share with other engines.
      registry: `etcd://HOST:PORT` where the deployment's servers registered.
      double_batching: override the deployment's choice for this client (True
        needs a deployment opened with two mailbox channels).
      expert_parallel: without a deployment, the number of local devices the
        routed experts are sharded over (the rest of the model is replicated;
        `eaas_jax.engine.expert_parallel`); 1 runs on one device.

    With a deployment, call `shutdown()` (or use the engine as a context
    manager) to stop the servers it started and remove their shared memory.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        max_num_seqs: int = 32,
        max_model_len: int | None = None,
        dtype="auto",
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_bytes: int = 2 << 30,
        max_num_batched_tokens: int | None = None,
        deployment: str | os.PathLike | LocalCluster | RegistryCluster | None = None,
        registry: str | None = None,
        double_batching: bool | None = None,
        expert_parallel: int = 1,
    ):
        if max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_num_seqs and block_size must be >= 1")
        if expert_parallel != 1 and deployment is not None:
            raise ValueError("expert_parallel shards the experts inside the engine; a deployment runs them in servers")
        if registry is not None and deployment is None:
            raise ValueError("registry needs a deployment (the file naming the servers to find)")
        self.dtype = resolve_dtype(dtype)
        self.runner: ModelRunner | None = None
        self.cluster = None
        self._owns_cluster = False
        self._client_endpoint = None  # ShmEndpoint or CudaIpcEndpoint
        sharding = None
        if deployment is None:
            model = load_model(model_path, dtype=self.dtype)
            self.config, client = model.config, model.client
            if expert_parallel == 1:
                experts = EmbeddedExperts(model.experts)
            else:
                experts = ExpertParallelExperts(model.experts, expert_mesh(expert_parallel))
                sharding = experts.replicated
        else:
            self.config = load_config(model_path)
            try:
                client, experts = self._connect(model_path, deployment, registry, double_batching)
            except BaseException:
                self.shutdown()
                raise
        try:
            self._init_scheduling(model_path, client, experts, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, block_size=block_size,
                                  num_kv_blocks=num_kv_blocks, kv_cache_bytes=kv_cache_bytes,
                                  max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                                  sharding=sharding)
        except BaseException:
            self.shutdown()
            raise

    def _connect(self, model_path, deployment, registry, double_batching):
        """Starts or finds the expert servers, opens this client's endpoint."""
        shared = isinstance(deployment, (LocalCluster, RegistryCluster))
        spec = deployment.deployment if shared else Deployment.load(deployment)
        spec.check(self.config)
        if double_batching is None:
            double_batching = spec.double_batching
        elif double_batching and not spec.double_batching:
            raise ValueError(
                f"double batching needs two mailbox channels, but {spec.source} sets double_batching = false"
            )
        if shared:
            self.cluster = deployment
        elif registry is not None:
            self.cluster, self._owns_cluster = RegistryCluster(registry, deployment, config=self.config), True
        else:
            self.cluster = LocalCluster(model_path, deployment, dtype=self.dtype.name)
            self._owns_cluster = True
        client = load_client(model_path, dtype=self.dtype)
        endpoint = self.cluster.claim_client()
        try:
            self._client_endpoint = spec.open_endpoint(self.cluster.shm_name, endpoint, self.config)
        except BaseException:
            self.cluster.release_client(endpoint)
            raise
        for server in spec.started_servers:
            self._client_endpoint.connect(server, timeout=30.0)
        experts = RemoteExpertBackend(
            self._client_endpoint, list(range(spec.num_server_endpoints)), spec.routing_table(self.config),
            timeout_us=spec.timeout_ms * 1000, double_batching=double_batching,
            min_timeout_us=None if spec.min_timeout_ms is None else spec.min_timeout_ms * 1000,
        )
        for server in set(range(spec.num_server_endpoints)) - set(spec.started_servers):
            experts.set_live(server, False)  # standby or spare: admitted once up (`_follow_membership`)
        self._probes = AdmissionProbes(self._client_endpoint)
        return client, experts

    def _init_scheduling(self, model_path, client, experts, *, max_num_seqs, max_model_len, block_size,
                         num_kv_blocks, kv_cache_bytes, max_num_batched_tokens, seed, sharding):
        limit = self.config.max_position_embeddings
        self.max_model_len = max_model_len or limit
        if not 2 <= self.max_model_len <= limit:
            raise ValueError(
                f"max_model_len must be in [2, max_position_embeddings={limit}], got {max_model_len}"
            )
        self.tokenizer = Tokenizer.from_directory(model_path)
        self.generation_defaults = GenerationDefaults.load(model_path)
        # Both files may name end-of-sequence ids (generation_config.json often more).
        self.eos_token_ids = tuple(
            dict.fromkeys(self.config.eos_token_ids + self.generation_defaults.eos_token_ids)
        )
        bad = [t for t in self.eos_token_ids if t >= self.config.vocab_size]
        if bad:
            raise ValueError(f"eos token ids {bad} of {model_path} are outside the vocabulary")

        blocks_per_seq = -(-self.max_model_len // block_size)
        if num_kv_blocks is None:
            block_bytes = block_size * kv_cache_bytes_per_token(self.config, self.dtype.itemsize)
            num_kv_blocks = max(blocks_per_seq, min(max_num_seqs * blocks_per_seq, kv_cache_bytes // block_bytes))
        if num_kv_blocks < blocks_per_seq:
            raise ValueError(
                f"num_kv_blocks={num_kv_blocks} cannot hold one sequence of max_model_len="
                f"{self.max_model_len} ({blocks_per_seq} blocks of {block_size})"
            )
        self.runner = ModelRunner(client, experts, num_blocks=num_kv_blocks, block_size=block_size,
                                  max_rows=max_num_seqs, sharding=sharding)
        self.scheduler = Scheduler(
            BlockAllocator(num_kv_blocks, block_size),
            max_num_seqs,
            max_num_batched_tokens or max(self.max_model_len, 2048),
            self.max_model_len,
        )
        # The steps queued on the device whose tokens have not been collected:
        # (their sequences in row order, the dispatched step).
        self._in_flight: list[tuple[list[Sequence], DispatchedStep]] = []
        self._last_fetched_at = 0.0  # monotonic time the host last had a step's results
        self._next_membership_check = 0.0
        # Server endpoint -> the incarnation (process) it was last seen up as:
        # one that was drained is admitted again only as a new process, one
        # that failed an exchange also after its probation and a probe.
        self._incarnations: dict[int, object] = {}
        self._probation = Probation(PROBATION_S, PROBATION_MAX_S)
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._requests: dict[str, Request] = {}
        self.metrics = ServingMetrics(
            self.config.num_moe_layers, self.config.num_experts,
            [] if self.cluster is None else _server_labels(self.cluster.deployment),
        )
        log.info(
            "engine ready: %s, dtype=%s, max_num_seqs=%d, max_model_len=%d, %d KV blocks of %d, experts %s",
            model_path, self.dtype.name, max_num_seqs, self.max_model_len, num_kv_blocks, block_size,
            "embedded" if self.cluster is None else f"in {len(self.cluster.deployment.started_servers)} servers",
        )

    # ----------------------------------------------------------------- lifetime

    def shutdown(self) -> None:
        """Leaves the deployment: closes this client's mailbox, frees its slot,
        and stops the expert servers this engine started (idempotent)."""
        if self._client_endpoint is not None:
            if self.runner is not None:
                self.runner.wait()  # a step still queued on the device uses the mailbox
            endpoint = self._client_endpoint
            self._client_endpoint = None
            endpoint.close()
            self.cluster.release_client(endpoint.endpoint)
        if self._owns_cluster:
            self._owns_cluster = False
            self.cluster.close()

    def drain_server(self, name: str) -> None:
        """Drains expert server `name`: it gets no tokens from the next step on,
        the steps already queued finish with it, then it is stopped if this
        engine's cluster started it (servers started elsewhere are only routed
        around: stop them once this returns). Refuses, changing nothing, when
        an expert would be left without a live replica."""
        if self.cluster is None:
            raise ValueError("drain_server needs a deployment: this engine's experts are embedded")
        deployment = self.cluster.deployment
        endpoint = self.cluster.endpoint_of(name)
        backend = self.runner.experts
        others = [s for s in range(deployment.num_server_endpoints) if s != endpoint and backend.is_live(s)]
        table = backend.table
        orphaned = np.argwhere((table == endpoint).any(-1) & ~np.isin(table, others).any(-1))
        if len(orphaned):
            layer, expert = orphaned[0]
            raise ValueError(f"draining {name!r} would leave {len(orphaned)} (MoE layer, expert) pairs with no "
                             f"live replica, e.g. (layer {layer}, expert {expert})")
        backend.set_live(endpoint, False)
        self._probation.forget(endpoint)  # drained: back only as a new process, not after a probation
        self.runner.wait()  # the steps queued before this one was routed around
        code = self.cluster.stop_server(name)
        log.info("drained expert server %r (exit code %s)", name, code)

    def metrics_text(self) -> str:
        """The engine's serving metrics (per-expert load, per-server traffic and
        failures, transport drops) in Prometheus' text exposition format."""
        live, transport = (), None
        if self.cluster is not None:
            live = [self.runner.experts.is_live(s) for s in range(self.cluster.deployment.num_server_endpoints)]
            if self._client_endpoint is not None:
                transport = self._client_endpoint.stats()
        return self.metrics.render(live=live, transport=transport)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- requests

    def _make_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, _ChatPrompt):
            ids, text = self.tokenizer.encode(prompt, add_special_tokens=False), str(prompt)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise ValueError("a token-id prompt must be a list of integers")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.config.vocab_size})")
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len} "
                "(at least one token must be generated)"
            )
        if params.stop and not self.tokenizer.available:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        bad_stops = [t for t in params.stop_token_ids if t >= self.config.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        return Request(request_id, text, ids, params, seed)

    def default_sampling_params(self) -> SamplingParams:
        """What requests without sampling params get: the checkpoint's
        generation_config.json values over `SamplingParams()`'s defaults."""
        return self.generation_defaults.sampling_params()

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queues a request; raises ValueError (queueing nothing) if it is invalid."""
        request = self._make_request(prompt, sampling_params or self.default_sampling_params(), request_id)
        self._enqueue(request)
        return request.request_id

    def _enqueue(self, request: Request) -> None:
        self._requests[request.request_id] = request
        for seq in request.sequences:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            for seq in request.sequences:
                self.scheduler.remove(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_compilations(self) -> int:
        return self.runner.num_compilations

    # --------------------------------------------------------------------- steps

    def step(self) -> list[RequestOutput]:
        """Runs one scheduling step; returns the outputs of the requests whose
        tokens it collected (finished ones for the last time: they are then
        forgotten).

        Steps overlap: this queues the next step on the device first, its
        decode rows reading the tokens of the step still in flight there, and
        only then waits for that step's tokens, so the host's bookkeeping runs
        while the device computes. A call therefore returns the tokens of the
        step queued by the call before it (the first returns none). A sequence
        ended by a stop token or string has computed one token past its end,
        which is dropped.
        """
        return [request.output(self.tokenizer) for request in self._advance()]

    def _advance(self) -> list[Request]:
        """`step()` without building outputs: the requests whose tokens arrived
        (finished ones are forgotten here)."""
        touched: dict[str, Request] = {}
        self._follow_membership()
        in_flight, self._in_flight = self._in_flight, []
        dispatched = []
        try:
            if len(in_flight) > 1:
                # A prefill and a decode step in flight: the next step's tokens
                # would come from both; collect them first.
                self._collect(in_flight, touched)
                in_flight = []
            prefill, decode = self.scheduler.schedule()
            now = time.time()
            for seq in prefill:
                if seq.request.metrics.first_scheduled_time is None:
                    seq.request.metrics.first_scheduled_time = now
            previous = in_flight[0] if in_flight else None
            for seqs, is_prefill in ((prefill, True), (decode, False)):
                if seqs:
                    dispatched.append((seqs, self._dispatch(seqs, is_prefill, previous)))
            self._collect(in_flight, touched)
        except BaseException as e:
            # Tokens of failed or abandoned steps are dropped; their sequences
            # run those positions again (rewriting the same cache slots).
            for seqs, _ in in_flight + dispatched:
                for seq in seqs:
                    seq.num_pending = 0
            if not isinstance(e, _StepRunAgain):
                raise
            dispatched = []
        self._in_flight = dispatched
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = time.time()
                del self._requests[request.request_id]
        return list(touched.values())

    def _dispatch(self, seqs: list[Sequence], is_prefill: bool, previous) -> DispatchedStep:
        """Queues a step for `seqs`; a decode row whose last token is pending
        reads it from `previous` (sequences, step) on the device."""
        source_row = {id(seq): i for i, seq in enumerate(previous[0])} if previous else {}
        rows = StepRows([], [], [], [], [])
        for seq in seqs:
            start = 0 if is_prefill else seq.num_tokens - 1
            if seq.num_pending:
                rows.tokens.append([0])  # placeholder for the token on the device
                rows.token_sources.append(source_row[id(seq)])
            else:
                rows.tokens.append(seq.all_ids if is_prefill else [seq.last_token])
                rows.token_sources.append(-1)
            rows.start_positions.append(start)
            rows.block_tables.append(seq.blocks)
            rows.sampling.append(seq.sampling_row(self.eos_token_ids))
        if not any(seq.num_pending for seq in seqs):
            rows, previous = rows._replace(token_sources=None), None
        want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
        step = self.runner.dispatch(rows, MAX_LOGPROBS if want_logprobs else 0,
                                    previous[1] if previous else None)
        for seq in seqs:
            seq.num_pending += 1
        return step

    def _follow_membership(self) -> None:
        """Applies the cluster's membership to the routing table from the next
        step on, asked at most every MEMBERSHIP_CHECK_S (clusters report a
        server up only once it is ready): a server that is gone (the process
        exited; with etcd, the lease expired) gets no more tokens, so no step
        waits out a deadline on it; one that came back as another process is
        routed to at its new inbox; one that came up (a standby one started,
        a failed or drained one running as a new process) is admitted; one
        marked dead by a failed exchange that is still up is probed once its
        probation ends and admitted when it answers. Tables change without
        recompiling."""
        now = time.monotonic()
        if self.cluster is None or now < self._next_membership_check:
            return
        self._next_membership_check = now + MEMBERSHIP_CHECK_S
        try:
            up = self.cluster.servers_up()
        except RegistryError as e:  # a registry outage is not a server failure
            log.warning("cannot tell which expert servers are up (%s); routing table unchanged", e)
            return
        backend = self.runner.experts
        for endpoint in range(self.cluster.deployment.num_server_endpoints):
            incarnation, known = up.get(endpoint), self._incarnations.get(endpoint)
            if backend.is_live(endpoint):
                if incarnation is None:
                    log.warning("%s is gone; routing around it", self.cluster.describe_server(endpoint))
                    self._route_out(endpoint)
                    continue
                if known is not None and incarnation != known:  # killed and restarted between two checks
                    log.warning("%s runs as a new process; sending to its new inbox",
                                self.cluster.describe_server(endpoint))
                    if not self._map_inbox(endpoint):
                        self._route_out(endpoint)
                self._incarnations[endpoint] = incarnation
                self._probation.served(endpoint, now)
            elif incarnation is None:
                self._probes.forget(endpoint)
            elif self._probes.outstanding(endpoint, incarnation):
                self._readmit_if_answered(endpoint, now)
            elif incarnation != known:
                self._incarnations[endpoint] = incarnation
                self._probation.forget(endpoint)  # a new process starts with a clean record
                self._probes.forget(endpoint)  # one sent to its predecessor
                self._admit(endpoint)
            elif self._probation.is_over(endpoint, now) and self._map_inbox(endpoint):
                self.runner.wait()  # steps queued while it was routed to would share its mailboxes
                self._probes.start(endpoint, incarnation)

    def _route_out(self, endpoint: int) -> None:
        """No tokens to server `endpoint` from the next step on (counted as marked dead)."""
        self.runner.experts.set_live(endpoint, False)
        self.metrics.server_marked_dead(endpoint)

    def _map_inbox(self, endpoint: int) -> bool:
        """Maps server `endpoint`'s current inbox (not a predecessor's); False
        (logged) if it cannot be reached yet."""
        try:
            self._client_endpoint.connect(endpoint)
        except (OSError, RuntimeError, ValueError) as e:  # the next check retries
            log.warning("cannot reach expert server %d yet: %s", endpoint, e)
            return False
        return True

    def _admit(self, endpoint: int, why: str = "") -> None:
        """Maps server `endpoint`'s inbox and routes tokens to it again; a
        server on a spare endpoint first takes its place in the routing table
        as a replica of what it hosts."""
        try:
            if endpoint in self.cluster.deployment.spare_range:
                self._place_joined_server(endpoint)
        except (ValueError, LookupError) as e:  # the next check retries
            log.warning("cannot admit expert server %d yet: %s", endpoint, e)
            return
        if self._map_inbox(endpoint):
            self.runner.experts.set_live(endpoint, True)
            log.info("admitted %s%s", self.cluster.describe_server(endpoint), why)

    def _readmit_if_answered(self, endpoint: int, now: float) -> None:
        """A server marked dead that stayed up, probed at the last check
        (`AdmissionProbes`): admitted if it answered, else probed again after
        a longer probation."""
        if self._probes.answered(endpoint):
            self._admit(endpoint, why=" (it failed an exchange but stayed up, and answered a probe)")
        else:
            seconds = self._probation.failed(endpoint, now)
            log.warning("%s did not answer a probe; probing again in %g s",
                        self.cluster.describe_server(endpoint), seconds)

    def _place_joined_server(self, endpoint: int) -> None:
        """Routes to the server that joined on spare `endpoint` the (layer,
        expert) pairs it registered (LookupError if it is gone again;
        ValueError if a pair is outside the model)."""
        joined = self.cluster.joined_servers()[endpoint]
        self.runner.experts.set_hosted(endpoint, joined.hosted)
        self.metrics.name_server(endpoint, joined.name)

    def _handle_failures(self, exchanges, step: DispatchedStep) -> dict[int, str]:
        """Servers that failed in a step get no more tokens from the next step
        on (their replicas take over; the step itself was completed by in-step
        failover). A step that left token slots unserved is run again where
        their servers only paused (`_paused_servers`); otherwise `_collect`
        fails the requests of those slots. Returns the failures (server ->
        what happened)."""
        failures = failed_servers(exchanges.statuses, exchanges.labels, self.cluster.describe_server,
                                  step.expert_arrays.timeout_us / 1000)
        anomalies = transport_anomalies(self.runner.experts.endpoint.stats()) if failures else ""
        if anomalies:
            failures = {server: f"{what} [this client's transport counters: {anomalies}]"
                        for server, what in failures.items()}
        unserved = int(np.sum(exchanges.unserved))
        paused = self._paused_servers(failures, step) if unserved else set()
        for server, what in failures.items():
            if self.runner.experts.is_live(server) and server not in paused:
                seconds = self._probation.failed(server, time.monotonic())
                log.warning("%s; routing around it (probed again in %g s if it stays up)", what, seconds)
                self._route_out(server)
        if paused:
            self._retry_with_full_deadlines(paused, failures, unserved)
        return failures

    def _paused_servers(self, failures: dict[int, str], step: DispatchedStep) -> set[int]:
        """Of the servers that failed a step leaving slots unserved, those
        still up as the same process, if the step's deadline was an adapted
        one below the maximum: a pause on every replica of some experts (a
        burst, a neighbour's teardown on a shared GPU) rather than their
        death, which a step run again with the full deadline rides out."""
        deadlines = self.runner.experts.deadlines
        if deadlines is None or step.expert_arrays.timeout_us >= deadlines.max_us:
            return set()
        try:
            up = self.cluster.servers_up()
        except RegistryError:
            return set()
        return {server for server in failures
                if up.get(server) is not None and up.get(server) == self._incarnations.get(server)}

    def _retry_with_full_deadlines(self, paused: set[int], failures: dict[int, str], unserved: int) -> None:
        """Keeps the paused servers live, clears what queued steps found of
        them, and has deadlines learnt again from the maximum; raises
        _StepRunAgain, which drops the step's tokens so that its positions
        run again. A second miss comes with the full deadline: no loop."""
        for server in paused:
            self.runner.experts.clear_failure(server)
            log.warning("%s, but it is still up", failures[server])
        self.runner.experts.deadlines.forget()
        self.metrics.retried_steps += 1
        log.warning("%d token-expert slots had no replica that replied in time; the step runs again with "
                    "the full deadline", unserved)
        raise _StepRunAgain

    def _collect(self, in_flight, touched: dict[str, "Request"]) -> None:
        """Waits for the dispatched steps' tokens and appends them."""
        for seqs, step in in_flight:
            result, exchanges = step.fetch()
            # The step's time on the device: it started when it was queued or
            # when the step before it ended, whichever came later (an upper
            # bound when the host fetches late).
            fetched_at = time.monotonic()
            seconds = fetched_at - max(step.dispatched_at, self._last_fetched_at)
            self._last_fetched_at = fetched_at
            self.metrics.observe(exchanges)
            self.metrics.observe_step_time(seconds)
            failures = {} if self.cluster is None else self._handle_failures(exchanges, step)
            if self.cluster is not None and not failures:
                self.runner.experts.observe_step(step.num_tokens, seconds)
            error = unserved_error(exchanges.unserved, failures) if exchanges.unserved_rows.any() else None
            now = time.time()
            for i, seq in enumerate(seqs):
                seq.num_pending -= 1
                request = seq.request
                if seq.finished or self._requests.get(request.request_id) is not request:
                    continue  # a token past a stop, or of an aborted request
                if exchanges.unserved_rows[i]:
                    # Its token missed an expert: the request fails. Rows are
                    # independent, so the step's other rows are exact.
                    self._fail(request, error)
                    touched[request.request_id] = request
                    continue
                top = (list(zip(result.top_ids[i].tolist(), result.top_logprobs[i].tolist()))
                       if seq.params.logprobs is not None else [])
                seq.append(
                    int(result.tokens[i]), float(result.logprobs[i]), int(result.ranks[i]), top,
                    self.tokenizer, self.eos_token_ids, self.max_model_len,
                )
                self.metrics.generated_tokens += 1
                metrics = request.metrics
                metrics.first_token_time = metrics.first_token_time or now
                metrics.last_token_time = now
                if seq.finished:
                    self.scheduler.remove(seq)
                touched[request.request_id] = request

    def _fail(self, request: Request, error: str) -> None:
        """Ends `request` (every completion) with `error`."""
        log.warning("request %s failed: %s", request.request_id, error)
        request.error = error
        for seq in request.sequences:
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.remove(seq)
        self.metrics.failed_requests += 1

    # ------------------------------------------------------------------ offline

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs in prompt order.

        Every prompt is validated before any work starts: one bad prompt raises
        ValueError and nothing is queued.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.default_sampling_params()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(self._make_request(prompt, p, None))
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        for request in requests:
            self._enqueue(request)

        results: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm)
        generated, start = 0, time.time()
        try:
            while len(results) < len(requests):
                # Outputs of finished requests only: decoding every running
                # completion's text at every step would cost more than the step.
                for request in self._advance():
                    if request.finished and request.request_id in wanted:
                        out = results[request.request_id] = request.output(self.tokenizer)
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(tok_per_s=f"{generated / (time.time() - start):.0f}")
        finally:
            bar.close()
            for request in requests:  # interrupted: leave nothing of ours queued
                if request.request_id not in results:
                    self.abort_request(request.request_id)
        outputs = [results[r.request_id] for r in requests]
        failed = [i for i, out in enumerate(outputs) if out.error]
        if failed:
            raise ExpertServerError(
                f"{len(failed)} of {len(outputs)} requests failed (prompts {_abbreviated(failed)}; the others "
                f"completed, see .outputs): {outputs[failed[0]].error}", outputs)
        return outputs

    def chat(
        self,
        messages: Seq[dict] | Seq[Seq[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation ([{"role": ..., "content": ...}])
        or a list of conversations, rendered with the checkpoint's chat template.

        The rendered text is tokenized without adding special tokens again (the
        template writes them), as transformers' `apply_chat_template` does.
        Each output's `prompt` is the rendered text.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = []
        for i, conversation in enumerate(conversations):
            try:
                text = self.tokenizer.apply_chat_template(
                    check_messages(conversation), add_generation_prompt=add_generation_prompt
                )
            except ValueError as e:
                raise type(e)(f"conversation {i}: {e}") from None
            prompts.append(_ChatPrompt(text))
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


class _ChatPrompt(str):
    """Prompt text rendered from a chat template: tokenized without adding
    special tokens, since the template already wrote them."""

    __slots__ = ()
