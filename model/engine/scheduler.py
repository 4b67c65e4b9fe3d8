"""The scheduler: which requests hold cache rows, and what each engine step computes.

One `Scheduler` owns the engine's state (waiting queue, running rows, free rows). A step is
three calls, as in vLLM's EngineCore.step (model/engine/core.py):

    plan = scheduler.schedule(out)       retire cancelled rows, admit waiting requests into the
                                         lowest free rows, choose the prompt chunks and the decode
    tokens = runner.execute(plan)        model/engine/runner.py: the forward and the sampling
    scheduler.update(plan, tokens, out)  push tokens to the streams, retire finished rows

With async scheduling (EngineConfig.async_scheduling) the engine calls update() for a step
after it has scheduled and launched the next one. A decoding row's bookkeeping therefore
advances when it is planned (`in_flight` counts its tokens sampled on the device and not yet
read), and a row whose token is in flight decodes again from that token on the device
(DecodeBatch.carried) unless it must stop whatever the token is (max_new_tokens, a full
context). An end that depends on the token (eos, a stop string) is seen one step late: the
token the row drew meanwhile is dropped, as in vLLM's async scheduling.

A plan (`StepPlan`) names everything the runner needs: which rows prefill which tokens at
which positions, and which rows decode; the runner never reads the scheduler's state.

Cache rows: a request keeps one row of `block_size` positions for its whole life. Free rows
are handed out lowest first, so running rows cluster at the bottom and a decode runs
`GPT.step` over rows 0..n-1 (row0=0). Rows in that range that are free or still prefilling
ride along with a harmless write at a position that is free or about to be overwritten by
their next prefill chunk.

Threads: `waiting` and the stop flags are shared with submitting threads under `cv` (which
also wakes the idle worker); `rows` and `free` belong to the worker thread alone.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from model.engine.config import EngineConfig
from model.engine.errors import EngineStopped, Overloaded
from model.engine.request import GenerationResult, Outbox, RequestHandle, TokenChunk
from model.generate import TextStream, context_window
from model.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    """A request as the scheduler tracks it, from submission to its result."""
    handle: RequestHandle
    params: SamplingParams
    tokens: list[int]  # prompt + generated: what a slide re-reads
    prompt_len: int
    stream: TextStream
    submitted: float
    seed: int = 0  # the request's, or one drawn from the engine's RNG when it is queued
    uid: int = -1  # set when queued; unlike id(), never reused
    row: int = -1
    n_cached: int = 0  # positions 0..n_cached-1 of the row hold this context
    pending: list[int] = field(default_factory=list)  # to feed next; exactly one = ready to decode
    in_flight: int = 0  # tokens sampled on the device and not read yet (async scheduling: 0 or 1)
    generated: list[int] = field(default_factory=list)
    admitted: float = 0.0
    first_token: float | None = None
    logprobs: list = field(default_factory=list)  # per generated token, when params.logprobs is set
    prompt_logprobs: list | None = None  # [None, then one per prompt token], when params.prompt_logprobs

    @property
    def decodable(self) -> bool:
        return len(self.pending) == 1

    def continues(self, block_size: int) -> bool:
        """Whether the row may decode from its in-flight token before it is read: only if no
        value of that token can end it (max_new_tokens) or make it slide (a full context)."""
        return (not self.pending and self.in_flight == 1 and len(self.generated) + 1 < self.params.max_new_tokens
                and self.n_cached < block_size)

    def scores_prompt(self, pos: int) -> bool:
        """Whether the chunk at `pos` holds prompt positions whose logprobs were asked for."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) == pos + 1 < self.prompt_len


# --- the plan: what one step computes ---------------------------------------------

@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens prefilled together in one batch: the rows (ascending), each row's first
    position, and its tokens (all of one length). No logits: the decode produces the last
    token's."""
    rows: tuple[int, ...]
    pos: tuple[int, ...]
    ids: tuple[tuple[int, ...], ...]
    # Prompt logprobs (only where some row asked): per row, the token each position is scored
    # against (the next one) and how many alternatives, or None; the runner returns hidden states.
    targets: tuple[tuple[int, ...] | None, ...] = ()
    top: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecodeBatch:
    """One token for each of rows 0..B-1 in one forward (B: the runner's batch bucket over the
    highest decoding row), then sampling. Rows that do not decode ride along: a free row
    writes at position 0, a prefilling row at its next prefill position (past this step's
    chunk), where nothing lives. Each tuple but `rows` has one entry per row 0..B-1."""
    rows: tuple[int, ...]  # the rows that sample a token, ascending
    idx: tuple[int, ...]  # the token each row feeds (0 where it rides along or is carried)
    pos: tuple[int, ...]  # the position it is written at
    steps: tuple[int, ...]  # tokens generated so far: the sampler's noise counter
    members: tuple[int | None, ...]  # the decoding request's uid, else None (sampling tensors follow it)
    params: tuple[SamplingParams | None, ...]  # the decoding request's sampling, else None
    seeds: tuple[int, ...]  # ... and its seed, else 0
    logprobs: tuple[int | None, ...] = ()  # per decoding row, top alternatives wanted, or None; () for none
    # Rows (ascending) that feed the token they sampled in the previous step, still on the device (async scheduling)
    carried: tuple[int, ...] = ()


@dataclass
class StepScores:
    """Logprobs a step computed (model/logprobs.TokenLogprob), by cache row: the prompt chunk's and
    the sampled token's. Empty unless some request asked."""
    prompt: dict = field(default_factory=dict)  # row -> [TokenLogprob] for its chunk's positions
    sampled: dict = field(default_factory=dict)  # row -> TokenLogprob of the token it sampled


@dataclass(frozen=True)
class StepPlan:
    """One step: the prompt chunks (run first), then the decode (None: no row decodes)."""
    prefill: tuple[PrefillChunk, ...] = ()
    decode: DecodeBatch | None = None

    @property
    def scored(self) -> bool:
        """Whether the step computes logprobs (the engine folds such a step back at once)."""
        return any(c.targets for c in self.prefill) or bool(self.decode and self.decode.logprobs)


# --- the state and the scheduler ---------------------------------------------------

@dataclass
class SchedulerState:
    """Everything the scheduler owns (see the module docstring for which thread owns what)."""

    max_batch: int
    waiting: collections.deque = field(default_factory=collections.deque)
    rows: list = field(default_factory=list)  # cache row -> Request | None
    free: list = field(default_factory=list)  # heap of free rows, lowest first
    stopping: bool = False
    drain: bool = True

    def __post_init__(self):
        self.rows = [None] * self.max_batch
        self.free = list(range(self.max_batch))

    def running(self) -> list[Request]:
        return [s for s in self.rows if s is not None]


class Scheduler:
    """Plans each step over one SchedulerState and folds the sampled tokens back in.

    `bucket(n)` rounds a decode of rows 0..n-1 up to the batch the runner will run (its CUDA
    graphs' sizes; n itself when eager), so that the plan covers every row that rides along."""

    def __init__(self, config: EngineConfig, block_size: int, eot_id: int | None,
                 bucket: Callable[[int], int] = lambda n: n):
        self.config, self.block_size, self.eot_id, self.bucket = config, block_size, eot_id, bucket
        self.state = SchedulerState(config.max_batch)
        self.cv = threading.Condition()
        self._rng = random.Random(config.seed if config.seed is not None else os.urandom(16))
        self._uids = itertools.count()

    # --- the submitting side (any thread) ----------------------------------------
    def add(self, req: Request, tokens_per_second: float = 0.0) -> None:
        """Queue a request: raises EngineStopped while stopping, Overloaded when the queue is
        full (retry_after from the queued work and `tokens_per_second`). A request without a
        seed of its own draws one from the engine's RNG here, in order of arrival."""
        with self.cv:
            if self.state.stopping:
                raise EngineStopped("engine is stopped or draining")
            if len(self.state.waiting) >= self.config.max_queue:
                raise Overloaded(self._retry_after(tokens_per_second))
            req.seed = req.params.seed if req.params.seed is not None else self._rng.getrandbits(63)
            req.uid = next(self._uids)
            self.state.waiting.append(req)
            self.cv.notify()

    def cancel(self, handle: RequestHandle) -> None:
        """Mark a request cancelled; its row is freed by the next step's schedule()."""
        handle.cancelled = True
        with self.cv:
            self.cv.notify()

    def stop(self, drain: bool) -> None:
        """Take no more requests; with drain, the worker finishes what is queued first."""
        with self.cv:
            self.state.stopping, self.state.drain = True, drain
            self.cv.notify_all()

    def wait_for_work(self) -> bool:
        """Block the worker until there is a step to run (True) or it should exit (False)."""
        st = self.state
        with self.cv:
            while not self._has_work() and not st.stopping:
                self.cv.wait()  # idle: sleep until add/cancel/stop notifies
            return not (st.stopping and (not st.drain or not self._has_work()))

    def occupancy(self) -> tuple[int, int, int]:
        """(running requests, waiting requests, cache positions in use)."""
        with self.cv:
            waiting = len(self.state.waiting)
        running = self.state.running()
        return len(running), waiting, sum(s.n_cached + len(s.pending) for s in running)

    def _has_work(self) -> bool:
        return bool(self.state.waiting) or len(self.state.free) < self.config.max_batch

    def _retry_after(self, tokens_per_second: float) -> float:
        """Seconds until the queue has likely moved: queued work / measured throughput."""
        backlog = sum(s.params.max_new_tokens for s in self.state.waiting)
        return float(min(60.0, max(1.0, backlog / max(tokens_per_second, 1.0))))

    # --- schedule: the plan of one step (worker thread) --------------------------
    def schedule(self, out: Outbox) -> StepPlan:
        """Retire cancelled requests (their results go to `out`), admit waiting ones, and plan
        the step. The rows' bookkeeping of prompt tokens advances here: update() expects the
        plan to have run."""
        self._admit_waiting(out)
        prefill = self._plan_prefill()
        return StepPlan(prefill=prefill, decode=self._plan_decode())

    def _admit_waiting(self, out: Outbox) -> None:
        """Retire cancelled rows, then move waiting requests into the lowest free rows."""
        st = self.state
        for seq in st.running():
            if seq.handle.cancelled:
                self._finish(seq, "cancelled", out)
        with self.cv:
            if any(s.handle.cancelled for s in st.waiting):
                for seq in [s for s in st.waiting if s.handle.cancelled]:
                    self._finish(seq, "cancelled", out)
                st.waiting = collections.deque(s for s in st.waiting if not s.handle.cancelled)
            while st.waiting and st.free:
                seq = st.waiting.popleft()
                seq.row = heapq.heappop(st.free)
                seq.pending, seq.n_cached = list(seq.tokens), 0
                seq.admitted = time.perf_counter()
                st.rows[seq.row] = seq

    def _plan_prefill(self) -> tuple[PrefillChunk, ...]:
        """Choose the step's prompt tokens (`prefill_budget`), oldest admission first, as
        chunks: rows given chunks of the same length share one. Only the oldest row may take
        a partial chunk: a sliver of a later prompt would split equal-length prompts into
        groups that no longer match. Each row's last pending token is left for the decode,
        which produces its logits."""
        running = self.state.running()
        prefilling = sorted((s for s in running if len(s.pending) > 1), key=lambda s: s.admitted)
        budget = self.prefill_budget(len(prefilling), sum(s.decodable for s in running))
        groups: dict[int, list[Request]] = collections.defaultdict(list)  # chunk length -> rows
        for seq in prefilling:
            n = min(budget, len(seq.pending) - 1)
            if n <= 0 or (groups and n < len(seq.pending) - 1):
                break
            groups[n].append(seq)
            budget -= n
        chunks = []
        for n, seqs in groups.items():
            seqs.sort(key=lambda s: s.row)
            chunks.append(PrefillChunk(tuple(s.row for s in seqs), tuple(s.n_cached for s in seqs),
                                       tuple(tuple(s.pending[:n]) for s in seqs), **_prompt_scoring(seqs, n)))
            for seq in seqs:
                seq.n_cached += n
                del seq.pending[:n]
        return tuple(chunks)

    def prefill_budget(self, prefilling: int, decoding: int) -> int:
        """Prompt tokens a step may prefill: idle_prefill_chunk while no row decodes (nobody
        to stall); else prefill_chunk for each decoding row's worth of rows waiting on their
        prompts, up to idle_prefill_chunk. A step's prefill delays every decoding row's next
        token; it is worth a longer delay when it starts more rows than it delays, so clients
        that arrive just after the first began decoding start together instead of a few per
        step (docs/engine.md)."""
        top = max(self.config.prefill_chunk, self.config.idle_prefill_chunk)
        if not decoding:
            return top
        return min(top, self.config.prefill_chunk * max(1, prefilling // decoding))

    def _plan_decode(self) -> DecodeBatch | None:
        """Every decodable row (after this step's chunks), and every row that continues from its
        in-flight token, as one batch over rows 0..B-1. Their bookkeeping advances here."""
        rows = tuple(r for r, s in enumerate(self.state.rows)
                     if s is not None and (s.decodable or s.continues(self.block_size)))
        if not rows:
            return None
        B = self.bucket(rows[-1] + 1)
        seqs = self.state.rows[:B]
        seqs = seqs + [None] * (B - len(seqs))
        chosen = set(rows)
        live = [s if s is not None and s.row in chosen else None for s in seqs]
        batch = DecodeBatch(
            rows=rows, idx=tuple(s.pending[0] if s and s.pending else 0 for s in live),
            pos=tuple(_write_position(s, self.block_size) for s in seqs),
            steps=tuple(len(s.generated) + s.in_flight if s is not None else 0 for s in seqs),
            members=tuple(s.uid if s else None for s in live), params=tuple(s.params if s else None for s in live),
            seeds=tuple(s.seed if s else 0 for s in live), logprobs=_sampled_scoring(self.state.rows, rows),
            carried=tuple(s.row for s in live if s and not s.pending))
        for s in live:
            if s is not None:  # its token's keys/values go into the cache at n_cached now
                s.n_cached, s.pending, s.in_flight = s.n_cached + 1, [], s.in_flight + 1
        return batch

    # --- update: fold the sampled tokens back (worker thread) --------------------
    def update(self, plan: StepPlan, tokens: list[int], out: Outbox, scores: StepScores | None = None) -> None:
        """Each decoding row's sampled token (tokens[i] for plan.decode.rows[i]): push it to the
        stream, then retire the row (eos, a stop string, max_new_tokens) or slide a full context.
        `scores`: the logprobs the runner computed for the rows that asked."""
        scores = scores or StepScores()
        for r, entries in scores.prompt.items():
            self.state.rows[r].prompt_logprobs += entries
        if plan.decode is None:
            return
        now = time.perf_counter()
        d = plan.decode
        for r, token in zip(d.rows, tokens):
            seq = self.state.rows[r]
            if seq is None or seq.uid != d.members[r]:
                continue  # it ended (eos, stop, cancelled) while this token was in flight: dropped
            seq.in_flight -= 1
            if seq.first_token is None:
                seq.first_token = now
            if token == self.eot_id and seq.params.stop_at_eot:
                self._finish(seq, "eos", out)
                continue
            seq.tokens.append(token)
            seq.generated.append(token)
            chunk = TokenChunk([token], seq.stream.push([token]))
            if r in scores.sampled or (seq.prompt_logprobs is not None and len(seq.generated) == 1):
                chunk = self._scored(seq, chunk, scores.sampled.get(r))
            out.put(seq.handle, chunk)
            if seq.stream.stopped:
                self._finish(seq, "stop", out)
            elif len(seq.generated) >= seq.params.max_new_tokens:
                self._finish(seq, "length", out)
            elif seq.in_flight:
                pass  # already decoding its next token from this one, on the device
            elif seq.n_cached == self.block_size:  # context full: slide (see context_window)
                seq.pending, seq.n_cached = context_window(seq.tokens, self.block_size), 0
            else:
                seq.pending = [token]

    @staticmethod
    def _scored(seq: Request, chunk: TokenChunk, sampled) -> TokenChunk:
        """The chunk of a request that asked for logprobs: the sampled token's, and with the first
        token the prompt's (all computed by now: prefill scored every prompt position)."""
        if sampled is not None:
            seq.logprobs.append(sampled)
        first = seq.prompt_logprobs is not None and len(seq.generated) == 1
        return dataclasses.replace(chunk, logprobs=(sampled,) if sampled is not None else None,
                                   prompt_logprobs=tuple(seq.prompt_logprobs) if first else None)

    # --- endings ---------------------------------------------------------------
    def fail_running(self, error: str) -> None:
        """A step failed: its running requests end with finish_reason "error"."""
        out = Outbox()
        for seq in self.state.running():
            self._finish(seq, "error", out, error)
        out.send()

    def cancel_everything(self) -> None:
        """The worker is exiting: every running and waiting request ends cancelled."""
        out = Outbox()
        for seq in self.state.running():
            self._finish(seq, "cancelled", out)
        with self.cv:
            while self.state.waiting:
                self._finish(self.state.waiting.popleft(), "cancelled", out)
        out.send()

    def _finish(self, seq: Request, reason: str, out: Outbox, error: str | None = None) -> None:
        tail = seq.stream.flush() if reason in ("length", "eos") else ""
        now = time.perf_counter()
        admitted = seq.admitted or now
        result = GenerationResult(
            token_ids=list(seq.generated), text=seq.stream.text, prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.generated), finish_reason=reason, queue_s=admitted - seq.submitted,
            ttft_s=None if seq.first_token is None else seq.first_token - seq.submitted,
            total_s=now - seq.submitted, error=error,
            logprobs=None if seq.params.logprobs is None else tuple(seq.logprobs),
            prompt_logprobs=None if seq.prompt_logprobs is None else tuple(seq.prompt_logprobs))
        out.put(seq.handle, TokenChunk([], tail) if tail else None, result)
        if seq.row >= 0:
            self.state.rows[seq.row] = None
            heapq.heappush(self.state.free, seq.row)
            seq.row = -1


def _write_position(seq: Request | None, block_size: int) -> int:
    """Where a row of the decode batch writes: a decoding row at its next position; a row riding
    along at its next prefill position (past this step's chunk), where nothing lives yet; a free
    row, or one whose full context waits on its in-flight token to slide, at 0 (rewritten
    before it is read)."""
    return seq.n_cached if seq is not None and seq.n_cached < block_size else 0


def _prompt_scoring(seqs: list[Request], n: int) -> dict:
    """PrefillChunk's targets/top for a chunk of n tokens of each of seqs: {} when no row scores."""
    if not any(s.scores_prompt(s.n_cached) for s in seqs):
        return {}
    targets = tuple(tuple(s.tokens[s.n_cached + 1:s.n_cached + 1 + n]) if s.scores_prompt(s.n_cached) else None
                    for s in seqs)
    return {"targets": targets, "top": tuple(s.params.prompt_logprobs or 0 for s in seqs)}


def _sampled_scoring(rows: list, decoding: tuple[int, ...]) -> tuple[int | None, ...]:
    """DecodeBatch.logprobs: per decoding row, its top-N wanted or None; () when no row wants any."""
    wanted = tuple(rows[r].params.logprobs for r in decoding)
    return wanted if any(w is not None for w in wanted) else ()
