"""The model runner: owns the KV cache and the device paths, and executes a step's plan.

At start-up (`setup`, once) it picks the CPU paths (model/engine/cpu_setup.py), allocates
the cache, captures CUDA graphs (model/engine/cuda_graphs.py) and warms up. Each step,
`launch(plan)` queues the plan's prompt chunks and decode and the sampling on the device and
starts one asynchronous copy of the tokens to the host; `read(launched)` waits for that copy,
the step's one host sync (`execute` is the two at once). Between them the engine may plan and
launch the next step (async scheduling): rows the plan marks `carried` feed the token they
sampled in the step before, taken on the device from `_last`. It never decides what to run:
the scheduler's plan (model/engine/scheduler.py) says so.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from model.engine.config import EngineConfig
from model.engine.cpu_setup import choose_cpu_attention, choose_cpu_linear
from model.engine.cuda_setup import choose_cuda_kernels
from model.engine.cuda_graphs import DecodeGraphs
from model.engine.scheduler import DecodeBatch, PrefillChunk, StepPlan, StepScores
from model.gpt import GPT, KVCache, StepPart, kv_cache_dtype
from model.kernels import triton_sampling
from model.logprobs import prompt_logprobs, token_logprobs
from model.sampling import BatchParams, SamplingParams, sample

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Launched:
    """A step queued on the device (ModelRunner.launch): its plan, the logprobs it computed, and
    where its tokens arrive on the host (CUDA: a pinned buffer, ready when `ready` has passed)."""
    plan: StepPlan
    scores: StepScores | None = None
    tokens: torch.Tensor | None = None  # (B,) on the host; None without a decode
    ready: torch.cuda.Event | None = None
    started: float = 0.0
    sampled: list[int] | None = None  # the decoding rows' tokens, once read


class ModelRunner:
    def __init__(self, model: GPT, config: EngineConfig):
        self.model, self.config = model, config
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cache_dtype = self.dtype  # decided in setup, with the CPU kernels
        self.n_vocab = model.tokenizer.n_vocab
        self.cache: KVCache | None = None
        self.graphs = DecodeGraphs()  # CUDA only; empty: eager decode
        self.cpu_linear: str | None = None  # on CPU, what choose_cpu_linear picked at start
        self.cpu_attention: str | None = None  # ... and choose_cpu_attention
        self.cuda_kernels: str | None = None  # on CUDA, what choose_cuda_kernels installed
        self._batch_key: tuple | None = None
        self._batch_params: BatchParams | None = None
        self._graph_params: BatchParams | None = None  # what the captured sampler's buffers hold
        self._last: torch.Tensor | None = None  # (max_batch,) each row's last sampled token, on the device
        self._host: list[torch.Tensor] = []  # CUDA: two pinned buffers the tokens are copied into, in turn
        self._launches = 0
        self._read_at = 0.0  # when the last step's tokens were read
        self.total_steps = 0  # steps that decoded
        self.last_batch = 0  # rows the last step decoded
        self.tokens_per_second = 0.0  # decode throughput, smoothed over recent steps

    @property
    def kv_cache_bytes(self) -> int:
        return KVCache.bytes_for(self.model.config, self.config.max_batch, self.cache_dtype)

    def bucket(self, n: int) -> int:
        """The batch a decode of rows 0..n-1 runs at: a captured graph's size, or n eager."""
        return self.graphs.bucket(n)

    # --- start-up -------------------------------------------------------------
    def setup(self) -> None:
        """Runs once before the worker starts: layout, cache, warm-up / graph capture."""
        invariant = self.config.batch_invariant
        if self.device.type == "cpu":  # outside inference_mode: parameters must stay normal tensors
            with torch.no_grad():
                self.cpu_linear = choose_cpu_linear(self.model, self.config.cpu_linear, every_row=invariant)
                self.cpu_attention = choose_cpu_attention(self.model, self.config.cpu_attention, chunks=invariant)
        elif invariant:
            raise ValueError(f"batch-invariant mode runs on CPU only so far; this model is on {self.device}")
        elif self.device.type == "cuda":
            self.cuda_kernels = choose_cuda_kernels(self.model, self.config.cuda_kernels)
        self.cache_dtype = kv_cache_dtype(self.model)
        with torch.inference_mode():
            self.cache = KVCache(self.model.config, self.config.max_batch, self.device, self.cache_dtype)
            self._last = torch.zeros(self.config.max_batch, dtype=torch.long, device=self.device)
            if self.device.type == "cuda":  # two: one step's copy lands while the host reads the other's
                self._host = [torch.zeros(self.config.max_batch, dtype=torch.long).pin_memory() for _ in range(2)]
            log.info("KV cache: %d rows x %d positions, %s, %.1f MiB", self.config.max_batch,
                     self.model.config.block_size, str(self.cache_dtype).removeprefix("torch."),
                     self.cache.nbytes / 2**20)
            if self.device.type == "cuda" and self.config.cuda_graphs:
                self.graphs.capture(self.model, self.cache, self.config.batch_buckets, self.config.max_batch,
                                    self.config.prefill_chunk, any_length=self.cuda_kernels == "triton",
                                    sampler=triton_sampling.sample if self.cuda_kernels == "triton" else None)
            self._warm_up()

    def _warm_up(self) -> None:
        """A prefill chunk, a decode and both samplers, so that the first request does not pay for
        allocation, the BLAS's choice of kernels or CUDA's lazy loading of them (writes to row 0, free)."""
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        idx = torch.zeros(1, min(self.config.prefill_chunk, self.model.config.block_size - 1), dtype=torch.long,
                          device=self.device)
        self.model.step(idx, zero, self.cache)
        logits = self.model.step(idx[:, :1], zero + idx.shape[1], self.cache)
        for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_p=0.9)):
            sample(logits[:, -1], BatchParams.build([params], [0], self.device), zero, self.n_vocab)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- one step ---------------------------------------------------------------
    def execute(self, plan: StepPlan, scores: StepScores | None = None) -> list[int]:
        """launch(plan) and read it: the sampled token of each of plan.decode.rows."""
        return self.read(self.launch(plan, scores))

    def launch(self, plan: StepPlan, scores: StepScores | None = None) -> Launched:
        """Queue the plan: its prompt chunks, and one token for rows 0..B-1, then sampling on the
        device. Eager, it is one pass over the weights for both; with CUDA graphs the chunks run
        first (a one-row chunk as a captured prefill where one fits it: eager, a chunk costs
        many small launches) and the captured decode is replayed. Logprobs the plan asks for
        (chunks with targets, DecodeBatch.logprobs) go into `scores`; they need the tokens,
        so such a step is read here already."""
        chunks = [c for c in plan.prefill if c.targets or not self._graph_prefill(c)]  # scoring runs eager
        eager = [self._step_part(c) for c in chunks]
        d = plan.decode
        if eager and (d is None or self.graphs):  # no decode to share the pass, or a captured one
            self._score_prompts(chunks, self.model.step_parts(eager, self.cache), scores)
            eager = []
        if d is None:
            return Launched(plan, scores)
        t0 = time.perf_counter()
        B = len(d.idx)
        bp = self._sampling_params(d)
        tokens = None
        if self.graphs:
            step = self.graphs.load(d.idx, d.pos, d.steps, self._carried_mask(d) if d.carried else None, self._last)
            fused = self.graphs.sampling
            if fused and bp is not self._graph_params:  # new members: the captured sampler's buffers
                self.graphs.set_sampling(bp.temperature, bp.top_k, bp.top_p, bp.seed)
                self._graph_params = bp
            logits, tokens = self.graphs.replay(B, max(d.pos) + 1)
            tokens = tokens if fused else None
        else:  # eager: the chunks, then the decode, in one pass over the weights
            idx = torch.tensor(d.idx, device=self.device)
            if d.carried:
                idx = torch.where(torch.tensor(self._carried_mask(d), dtype=torch.bool, device=self.device),
                                  self._last[:B], idx)
            decode = StepPart(idx.unsqueeze(1), torch.tensor(d.pos, device=self.device), kv_len=max(d.pos) + 1)
            step = torch.tensor(d.steps, device=self.device)
            *hidden, logits = self.model.step_parts(eager + [decode], self.cache)
            self._score_prompts(chunks if eager else [], hidden, scores)
        tokens = self._sample(logits[:, -1], bp, step) if tokens is None else tokens
        if self.config.async_scheduling:  # what carried rows of the next step feed (only that mode carries)
            self._last[:B].copy_(tokens)
        launched = Launched(plan, scores, tokens, started=t0)
        if self._host:  # CUDA: copy to pinned memory without waiting, and mark when it has landed
            launched.tokens = self._host[self._launches % 2][:B]
            launched.tokens.copy_(tokens, non_blocking=True)
            launched.ready = torch.cuda.Event()
            launched.ready.record()
        self._launches += 1
        if d.logprobs and scores is not None:
            self._score_samples(logits, d, self.read(launched), scores)
        return launched

    def read(self, launched: Launched) -> list[int]:
        """The sampled token of each of the launched plan's decoding rows (waits for the copy)."""
        d = launched.plan.decode
        if d is None:
            self.last_batch = 0
            return []
        if launched.sampled is None:
            if launched.ready is not None:
                launched.ready.synchronize()
            tokens = launched.tokens.tolist()
            launched.sampled = [tokens[r] for r in d.rows]
            now = time.perf_counter()
            self._count(len(d.rows), now - max(launched.started, self._read_at))
            self._read_at = now
        return launched.sampled

    @staticmethod
    def _carried_mask(d: DecodeBatch) -> list[int]:
        """Per row 0..B-1: 1 where it feeds its token of the step before (DecodeBatch.carried)."""
        mask = [0] * len(d.idx)
        for r in d.carried:
            mask[r] = 1
        return mask

    def _sample(self, logits: torch.Tensor, bp: BatchParams, step: torch.Tensor) -> torch.Tensor:
        """The decode's tokens: by the one fused Triton kernel on the Triton CUDA path
        (model/kernels/triton_sampling.py), else model/sampling.sample (the same tokens for the
        same seeds, up to top-p's rounding boundary that module describes)."""
        if self.cuda_kernels == "triton" and not bp.all_greedy:
            return triton_sampling.sample(logits, bp.temperature, bp.top_k, bp.top_p, bp.seed, step, self.n_vocab)
        return sample(logits, bp, step, self.n_vocab)

    def _graph_prefill(self, c: PrefillChunk) -> bool:
        """A one-row chunk through a captured prefill graph; False where none applies."""
        return bool(self.graphs) and len(c.rows) == 1 and self.graphs.prefill(c.rows[0], c.pos[0], c.ids[0])

    def _step_part(self, c: PrefillChunk) -> StepPart:
        """A chunk as GPT.step_parts' batch (no logits: the decode produces the last token's)."""
        contiguous = c.rows[-1] - c.rows[0] == len(c.rows) - 1  # rows are distinct and sorted
        return StepPart(idx=torch.tensor(c.ids, device=self.device), pos=torch.tensor(c.pos, device=self.device),
                        row0=c.rows[0], kv_len=max(c.pos) + len(c.ids[0]), logits="hidden" if c.targets else None,
                        rows=None if contiguous else torch.tensor(c.rows, device=self.device))

    # --- logprobs, for the rows that asked (the plan says which) -------------------
    def _score_prompts(self, chunks: list[PrefillChunk], hidden: list, scores: StepScores | None) -> None:
        """Each scoring row's prompt logprobs: position p's final hidden state scores token p + 1,
        the output layer over PROMPT_CHUNK positions at a time."""
        for c, h in zip(chunks, hidden):
            for b, targets in enumerate(c.targets):
                if targets is None or scores is None:
                    continue
                ids = torch.tensor(targets, device=self.device)
                scores.prompt[c.rows[b]] = prompt_logprobs(h[b, :len(targets)], self.model.lm_head, ids, c.top[b],
                                                           self.n_vocab)

    def _score_samples(self, logits: torch.Tensor, d: DecodeBatch, sampled: list[int], scores: StepScores) -> None:
        """The sampled token's logprob and top alternatives, for the decoding rows that want them
        (log-softmax of the raw logits: temperature and truncation do not enter)."""
        want = [(r, t, n) for r, t, n in zip(d.rows, sampled, d.logprobs) if n is not None]
        index = torch.tensor([r for r, _, _ in want], device=logits.device)
        chosen = torch.tensor([t for _, t, _ in want], device=logits.device)
        entries = token_logprobs(logits[index, -1], chosen, max(n for _, _, n in want), self.n_vocab)
        for (r, _, n), entry in zip(want, entries):
            scores.sampled[r] = dataclasses.replace(entry, top=entry.top[:n])

    def _sampling_params(self, d: DecodeBatch) -> BatchParams:
        """Per-row sampling tensors, rebuilt only when the batch's membership changes."""
        if d.members != self._batch_key:
            self._batch_params = BatchParams.build(list(d.params), list(d.seeds), self.device)
            self._batch_key = d.members
        return self._batch_params

    def _count(self, rows: int, seconds: float) -> None:
        self.tokens_per_second = (0.8 * self.tokens_per_second + 0.2 * (rows / seconds) if self.tokens_per_second
                                  else rows / seconds)
        self.total_steps += 1
        self.last_batch = rows
