"""`Engine`: load a checkpoint, accept requests, run continuous batching."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from typing import Sequence as Seq

from tqdm.auto import tqdm

from eaas_jax.checkpoint.directory import load_client, load_config, load_model
from eaas_jax.engine.block_allocator import BlockAllocator, kv_block_count
from eaas_jax.engine.dtypes import resolve_dtype
from eaas_jax.engine.expert_parallel import ExpertParallelExperts, expert_mesh
from eaas_jax.engine.generation_config import GenerationDefaults
from eaas_jax.engine.metrics import ServingMetrics, render_families
from eaas_jax.engine.outputs import RequestOutput
from eaas_jax.engine.prompts import chat_prompts, Prompt, RequestBuilder, abbreviated, paired_with_params
from eaas_jax.engine.runner import DispatchedStep, EmbeddedExperts, ModelRunner, compiles_alongside_steps
from eaas_jax.engine.sampling_params import SamplingParams
from eaas_jax.engine.scheduler import Scheduler, step_options, step_rows
from eaas_jax.engine.sequence import Request, Sequence
from eaas_jax.engine.tokenizer import Tokenizer
from eaas_jax.engine.warmup import WarmupPlan, plan_warmup
from eaas_jax.model.attention import kv_cache_bytes_per_token
from eaas_jax.attention_client.remote_backend import ExpertServerError
from eaas_jax.control_plane.cluster import LocalCluster, RegistryCluster
from eaas_jax.control_plane.server_pool import RunStepAgain, ServerPool

log = logging.getLogger(__name__)

#: Decode tokens a row samples per step program by default, where the experts
#: run in the engine. The host's work around a step program (scheduling, the
#: jitted call, collecting tokens) bounds small batches on a GPU: W1 on an
#: H100 at batch 1 took 1.68 ms a token in one-token steps and 0.92 ms in
#: windows of 4, and batches 64 and 256 within their runs' spread (bench/
#: RESULTS.md, W1 decode at f4f1d24). Larger windows drop more work after a
#: stop and deliver tokens in coarser bursts for little more: 4 is the
#: measured point.
DEFAULT_DECODE_WINDOW = 4


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
      decode_window: decode tokens a row samples in one step program (its
        tokens fed back on the device), for the host's per-step cost once per
        window: tokens then arrive that many at a time. Steps whose rows have
        not reached min_tokens run one token (while such a sequence runs,
        the whole batch's steps do). Experts in the
        engine's graph only (expert servers report each token's step). Step
        metrics (step time, steps) count program calls, a window each.
        Default (None): DEFAULT_DECODE_WINDOW without a deployment, else 1.

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
        decode_window: int | None = None,
    ):
        if max_num_seqs < 1 or block_size < 1:
            raise ValueError("max_num_seqs and block_size must be >= 1")
        if decode_window is None:
            decode_window = DEFAULT_DECODE_WINDOW if deployment is None else 1
        if not isinstance(decode_window, int) or isinstance(decode_window, bool) or decode_window < 1:
            raise ValueError(f"decode_window must be an integer >= 1, got {decode_window!r}")
        if decode_window > 1 and deployment is not None:
            raise ValueError("decode_window > 1 needs the experts in the engine (no deployment): expert servers "
                             "report each token's step")
        if expert_parallel != 1 and deployment is not None:
            raise ValueError("expert_parallel shards the experts inside the engine; a deployment runs them in servers")
        if registry is not None and deployment is None:
            raise ValueError("registry needs a deployment (the file naming the servers to find)")
        self.dtype = resolve_dtype(dtype)
        self.runner: ModelRunner | None = None
        self.pool: ServerPool | None = None  # the expert servers, with a deployment
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
            self.pool = ServerPool(model_path, deployment, config=self.config, dtype=self.dtype.name,
                                   registry=registry, double_batching=double_batching)
        try:
            if self.pool is not None:
                client, experts = load_client(model_path, dtype=self.dtype), self.pool.experts
            self._init_scheduling(model_path, client, experts, max_num_seqs=max_num_seqs,
                                  max_model_len=max_model_len, block_size=block_size,
                                  num_kv_blocks=num_kv_blocks, kv_cache_bytes=kv_cache_bytes,
                                  max_num_batched_tokens=max_num_batched_tokens, seed=seed,
                                  sharding=sharding, decode_window=decode_window)
        except BaseException:
            self.shutdown()
            raise

    @property
    def cluster(self) -> LocalCluster | RegistryCluster | None:
        """The deployment's servers (None when the experts are embedded)."""
        return None if self.pool is None else self.pool.cluster

    def _init_scheduling(self, model_path, client, experts, *, max_num_seqs, max_model_len, block_size,
                         num_kv_blocks, kv_cache_bytes, max_num_batched_tokens, seed, sharding, decode_window):
        limit = self.config.max_position_embeddings
        self.max_model_len = max_model_len or limit
        if not 2 <= self.max_model_len <= limit:
            raise ValueError(
                f"max_model_len must be in [2, max_position_embeddings={limit}], got {max_model_len}"
            )
        self.tokenizer = Tokenizer.from_directory(model_path)
        self.generation_defaults = GenerationDefaults.load(model_path)
        self.eos_token_ids = self.generation_defaults.eos_token_ids_with(self.config, model_path)

        num_kv_blocks = kv_block_count(num_kv_blocks, max_model_len=self.max_model_len, block_size=block_size,
                                       max_num_seqs=max_num_seqs, kv_cache_bytes=kv_cache_bytes,
                                       bytes_per_token=kv_cache_bytes_per_token(self.config, self.dtype.itemsize))
        self.runner = ModelRunner(client, experts, num_blocks=num_kv_blocks, block_size=block_size,
                                  max_rows=max_num_seqs, sharding=sharding, max_window=decode_window)
        self.scheduler = Scheduler(
            BlockAllocator(num_kv_blocks, block_size),
            max_num_seqs,
            max_num_batched_tokens or max(self.max_model_len, 2048),
            self.max_model_len,
            decode_window,
        )
        # The steps queued on the device whose tokens have not been collected:
        # (their sequences in row order, the dispatched step).
        self._in_flight: list[tuple[list[Sequence], DispatchedStep]] = []
        self._request_builder = RequestBuilder(self.tokenizer, self.config.vocab_size, self.max_model_len, seed)
        self._requests: dict[str, Request] = {}
        self.metrics = ServingMetrics(
            self.config.num_moe_layers, self.config.num_experts,
            [] if self.pool is None else self.pool.server_labels(),
        )
        if self.pool is not None:
            self.pool.report_to(self.metrics)
        log.info(
            "engine ready: %s, dtype=%s, max_num_seqs=%d, max_model_len=%d, %d KV blocks of %d, experts %s",
            model_path, self.dtype.name, max_num_seqs, self.max_model_len, num_kv_blocks, block_size,
            "embedded" if self.pool is None else self.pool.describe(),
        )

    # ----------------------------------------------------------------- lifetime

    def shutdown(self) -> None:
        """Leaves the deployment: closes this client's mailbox, frees its slot,
        and stops the expert servers this engine started (idempotent)."""
        if self.runner is not None:
            self.stop_warm_up()
        if self.pool is not None:
            self.pool.close(self.runner.wait if self.runner is not None else lambda: None)

    def drain_server(self, name: str) -> None:
        """Drains expert server `name`: it gets no tokens from the next step on,
        the steps already queued finish with it, then it is stopped if this
        engine's cluster started it (servers started elsewhere are only routed
        around: stop them once this returns). Refuses, changing nothing, when
        an expert would be left without a live replica."""
        if self.pool is None:
            raise ValueError("drain_server needs a deployment: this engine's experts are embedded")
        self.pool.drain(name, self.runner.wait)

    def metrics_text(self) -> str:
        """The engine's serving metrics (per-expert load, per-server traffic and
        failures, transport drops, latencies, scheduler and KV cache use) in
        Prometheus' text exposition format."""
        return render_families(self.metric_families())

    def metric_families(self) -> list:
        """`metrics_text`'s families (prometheus_client's), for a registry of one's own."""
        allocator = self.scheduler.allocator
        gauges = {
            "eaas_requests_unfinished": (len(self._requests), "Requests queued or running."),
            "eaas_sequences_running": (len(self.scheduler.running), "Sequences holding KV blocks."),
            "eaas_sequences_waiting": (len(self.scheduler.waiting), "Sequences waiting to be scheduled."),
            "eaas_kv_blocks_used": (allocator.num_blocks - allocator.num_free, "KV cache blocks in use."),
            "eaas_kv_blocks": (allocator.num_blocks, "KV cache blocks in all."),
            "eaas_step_compile_waits": (self.runner.num_compile_waits,
                                        "Steps that waited for their program to compile (a shape met first)."),
            "eaas_step_programs": (self.runner.num_compilations, "Step programs compiled or compiling."),
            "eaas_step_programs_compiling": (self.runner.num_compiling,
                                             "Step programs queued for a compile or compiling (warm-up)."),
            "eaas_preemptions": (self.scheduler.num_preemptions,
                                 "Sequences preempted since start (KV cache full: recomputed later)."),
        }
        if self.pool is None:
            return self.metrics.families(gauges=gauges)
        return self.metrics.families(live=self.pool.live_mask(), transport=self.pool.transport_stats(), gauges=gauges)

    def recover(self) -> None:
        """After `step()` raised: aborts every request and rebuilds the
        device state (KV cache, carry) a failed step may have consumed, so
        that the engine can serve again. Raises if the device cannot."""
        for request_id in list(self._requests):
            self.abort_request(request_id)
        self._in_flight = []
        self.runner.reset()

    def unservable(self) -> str | None:
        """Why the engine cannot serve requests now (e.g. some expert has no
        live replica left), or None when it can."""
        return None if self.pool is None else self.pool.unservable()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- requests

    def default_sampling_params(self) -> SamplingParams:
        """What requests without sampling params get: the checkpoint's
        generation_config.json values over `SamplingParams()`'s defaults."""
        return self.generation_defaults.sampling_params()

    def add_request(
        self, prompt: Prompt, sampling_params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queues a request; raises ValueError (queueing nothing) if it is invalid."""
        request = self._request_builder.build(prompt, sampling_params or self.default_sampling_params(), request_id,
                                              self._requests)
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
        """Step shapes compiled (or compiling) so far."""
        return self.runner.num_compilations

    def warm_up(self, *, later: str = "auto", use_tqdm: bool = True,
                traffic: tuple[int, int] | None = None) -> WarmupPlan:
        """Compiles the step programs the queued requests will need before
        they run (`engine.warmup` says which are foreseen): the first prefill's
        and decode's now, in parallel, with a progress bar. With `traffic`
        (prompt tokens, tokens generated) nothing need be queued: the shapes
        are those of max_num_seqs such requests arriving at once, and of
        requests at most that long arriving apart, sampled with the defaults
        and greedy (a server warming up for requests to come). The shapes later
        steps are likely to meet (`later`): "background" compiles them on
        background threads while the steps run (a step of a shape still
        compiling waits for it); "now" compiles them before returning too;
        "when_met" leaves them to the steps; "auto" is "background" where
        compiling costs the steps little (`compiles_alongside_steps`: not on a
        CPU of few cores), else "when_met". `stop_warm_up()` (and `shutdown()`)
        drop the background compiles not started. Call it after queueing the
        requests and before the first step."""
        if later not in ("auto", "background", "now", "when_met"):
            raise ValueError(f"later must be 'auto', 'background', 'now' or 'when_met', got {later!r}")
        if self._in_flight or self.scheduler.running:
            raise RuntimeError("warm_up foresees a run of queued requests: call it before the first step")
        allocator = self.scheduler.allocator
        batches = [list(self.scheduler.waiting)]
        if traffic is not None:
            prompt_tokens, max_tokens = traffic
            if not (1 <= prompt_tokens < self.max_model_len and max_tokens >= 1):
                raise ValueError(f"traffic must be (prompt tokens in [1, {self.max_model_len}), tokens >= 1), "
                                 f"got {traffic}")
            # Sampled with the defaults, and greedy (another program): a seed
            # and ids of their own, so that the engine's seed generator and id
            # counter do not move for requests never run.
            default = self.default_sampling_params()
            batches = [[seq for i in range(self.scheduler.max_num_seqs) for seq in self._request_builder.build(
                [1] * prompt_tokens, dataclasses.replace(default, max_tokens=max_tokens, n=1, seed=0,
                                                         temperature=temperature),
                f"warm-up-{i}", ()).sequences] for temperature in dict.fromkeys((default.temperature, 0.0))]
        plans = [plan_warmup(seqs, max_num_seqs=self.scheduler.max_num_seqs,
                             max_num_batched_tokens=self.scheduler.max_num_batched_tokens,
                             block_size=allocator.block_size, num_free_blocks=allocator.num_free,
                             max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
                             arrivals=traffic is not None, decode_window=self.scheduler.decode_window)
                 for seqs in batches]
        first = list(dict.fromkeys(s for p in plans for s in p.first))
        plan = WarmupPlan(first, [s for s in dict.fromkeys(s for p in plans for s in p.later) if s not in first])
        if later == "auto":
            later = "background" if compiles_alongside_steps() else "when_met"
        now = plan.first + (plan.later if later == "now" else [])
        start = time.monotonic()
        bar = tqdm(total=len(now), desc="warm-up: compiling", unit="shape", disable=not use_tqdm)
        try:
            self.runner.compile(now, on_done=lambda _: bar.update(1))
        finally:
            bar.close()
        log.info("warm-up: %d step shapes compiled in %.1f s%s", len(now), time.monotonic() - start,
                 f"; {len(plan.later)} more foreseen, {later}" if later != "now" else "")
        if later == "background":
            self.runner.compile(plan.later, background=True)
        return plan

    def stop_warm_up(self) -> None:
        """Drops the background compiles of `warm_up` not started (those
        running finish): what a run that has ended did not need."""
        self.runner.stop_compiling()

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
        ended by a stop token or string has computed one token past its end
        (with `decode_window`, up to a window's), which is dropped.
        """
        return [request.output(self.tokenizer) for request in self._advance()]

    def step_finished(self) -> list[RequestOutput]:
        """`step()`, returning the outputs of the requests it finished only:
        a running request's output decodes its whole text, which costs more
        than the step when nobody reads it (offline and batch runs)."""
        return [request.output(self.tokenizer) for request in self._advance() if request.finished]

    def _advance(self) -> list[Request]:
        """`step()` without building outputs: the requests whose tokens arrived
        (finished ones are forgotten here)."""
        touched: dict[str, Request] = {}
        if self.pool is not None:
            self.pool.follow_membership(self.runner.wait)
        in_flight, self._in_flight = self._in_flight, []
        dispatched = []
        try:
            if len(in_flight) > 1:
                # A prefill and a decode step in flight: the next step's tokens
                # would come from both; collect them first.
                self._collect(in_flight, touched)
                in_flight = []
            prefill, decode = self.scheduler.schedule()
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
            if not isinstance(e, RunStepAgain):
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
        rows = step_rows(seqs, is_prefill, previous[0] if previous else None, self.eos_token_ids,
                         1 if is_prefill else self.scheduler.window, self.max_model_len)
        num_top_logprobs, num_prompt_logprobs = step_options(seqs, is_prefill)
        step = self.runner.dispatch(rows, num_top_logprobs, previous[1] if rows.token_sources is not None else None,
                                    num_prompt_logprobs)
        for seq, n in zip(seqs, rows.window_tokens or itertools.repeat(1)):
            seq.num_pending += n
        return step

    def _collect(self, in_flight, touched: dict[str, "Request"]) -> None:
        """Waits for the dispatched steps' tokens and appends them."""
        for seqs, step in in_flight:
            results, exchanges, seconds = self.runner.fetch(step)
            self.metrics.observe(exchanges)
            self.metrics.observe_step_time(seconds)
            error = (None if self.pool is None else
                     self.pool.after_step(exchanges, step.expert_arrays, step.num_tokens, seconds))
            now = time.time()
            # Python values once, not a numpy scalar per row: this loop runs
            # for every row of every step, and bounds the host at large batches.
            sampled = [(r.tokens.tolist(), r.logprobs.tolist(), r.ranks.tolist()) for r in results]
            unserved = exchanges.unserved_rows.tolist()
            requests, tokenizer, eos_ids, max_model_len = self._requests, self.tokenizer, self.eos_token_ids, \
                self.max_model_len
            for i, (seq, num_sampled) in enumerate(zip(seqs, step.row_tokens or itertools.repeat(1))):
                seq.num_pending -= num_sampled
                request = seq.request
                if seq.finish_reason is not None or requests.get(request.request_id) is not request:
                    continue  # a token past a stop, or of an aborted request
                if unserved[i]:
                    # Its token missed an expert: the request fails. Rows are
                    # independent, so the step's other rows are exact.
                    self._fail(request, error)
                    touched[request.request_id] = request
                    continue
                if results[0].prompt_logprobs is not None and request.wants_prompt_logprobs:
                    request.set_prompt_logprobs(results[0], i, tokenizer)
                appended = 0
                while appended < num_sampled and seq.finish_reason is None:  # (a window's past a stop: dropped)
                    tokens, logprobs, ranks = sampled[appended]
                    result = results[appended]
                    top = (list(zip(result.top_ids[i].tolist(), result.top_logprobs[i].tolist()))
                           if seq.params.logprobs is not None else [])
                    seq.append(tokens[i], logprobs[i], ranks[i], top, tokenizer, eos_ids, max_model_len)
                    appended += 1
                self.metrics.generated_tokens += appended
                metrics = request.metrics
                if metrics.first_token_time is None:
                    metrics.first_token_time = now
                    self.metrics.ttft_seconds.observe(now - metrics.arrival_time)
                    self.metrics.prompt_tokens += len(request.prompt_ids)
                elif metrics.last_token_time != now:  # once per step for the completions of one request
                    # A window's tokens arrive together: each counts the
                    # window's mean time a token.
                    self.metrics.itl_seconds.observe((now - metrics.last_token_time) / appended, appended)
                metrics.last_token_time = now
                if seq.finish_reason is not None:
                    self.scheduler.remove(seq)
                touched[request.request_id] = request

    def _fail(self, request: Request, error: str) -> None:
        log.warning("request %s failed: %s", request.request_id, error)
        for seq in request.fail(error):
            self.scheduler.remove(seq)
        self.metrics.failed_requests += 1

    # ------------------------------------------------------------------ offline

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        warmup: bool = False,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt; outputs in prompt order.

        Every prompt is validated before any work starts: one bad prompt raises
        ValueError and nothing is queued. `warmup` compiles the step shapes
        the prompts will need first (`warm_up`); nothing else may be running.
        """
        prompts, params = paired_with_params(prompts, sampling_params, self.default_sampling_params)
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(self._request_builder.build(prompt, p, None, self._requests))
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        for request in requests:
            self._enqueue(request)

        results: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm)
        generated, start = 0, time.time()
        try:
            if warmup:
                self.warm_up(use_tqdm=use_tqdm)
            while len(results) < len(requests):
                for out in self.step_finished():
                    if out.request_id in wanted:
                        results[out.request_id] = out
                        generated += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(tok_per_s=f"{generated / (time.time() - start):.0f}")
        finally:
            bar.close()
            self.stop_warm_up()
            for request in requests:  # interrupted: leave nothing of ours queued
                if request.request_id not in results:
                    self.abort_request(request.request_id)
        outputs = [results[r.request_id] for r in requests]
        failed = [i for i, out in enumerate(outputs) if out.error]
        if failed:
            raise ExpertServerError(
                f"{len(failed)} of {len(outputs)} requests failed (prompts {abbreviated(failed)}; the others "
                f"completed, see .outputs): {outputs[failed[0]].error}", outputs)
        return outputs

    def chat(
        self,
        messages: Seq[dict] | Seq[Seq[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
        warmup: bool = False,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation ([{"role": ..., "content": ...}])
        or a list of conversations, rendered with the checkpoint's chat template.

        The rendered text is tokenized without adding special tokens again (the
        template writes them), as transformers' `apply_chat_template` does.
        Each output's `prompt` is the rendered text.
        """
        prompts = chat_prompts(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, warmup=warmup)
