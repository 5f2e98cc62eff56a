"""One replica, many requests at once: a scheduler thread owns the runtime and runs every
waiting request's decode step as one `Runtime.decode_many` call.

Each request keeps its pipeline in its own thread (prompt, post-processing, reranking); its
runtime is a `ScheduledRuntime`, whose calls wait for the scheduler thread. Its decode loop
(sampling.DecodeLoop: sampler, alignment, stop rules, deadline) is handed over whole
(`run_loop`): the scheduler thread samples each loop's tokens right after the step that
computed their logits and puts its next step in the next batch, so a step costs no thread
hand-off and no wait for a request's thread to come back (drive_loops=False keeps the
loop in the request's thread, each step a decode call: the comparison of bench host).
One scheduler iteration:

    gather     wait (up to gather_ms) for the requests that got an answer at the last step
               boundary to come back with their next call; small calls (start_branches,
               select_branches, adopt, branch_from) are answered at once meanwhile
    decode     every waiting decode step and every driven loop's step, as one decode_many
               (requests join at step boundaries and leave when their loop ends); then the
               driven loops sample from their logits
    prefill    up to prefill_chunk_tokens of newcomers' prompts, shortest first, a long
               prompt in chunks: successive prefills over its own prefix, so a cold prompt
               costs the others one chunk per step, not its whole length. Where the
               runtime fuses chunks (Runtime.fused_chunk_tokens, the CUDA graphs), the
               shortest waiting prompt's next chunk rides the decode step instead, one
               pass over the weights for both, and the others wait for the next step

A prompt that differs from its previous state in a few last tokens (typed, or rewritten: a
backspace, a back-off that moved, an unchanged prompt whose last token is computed again for
its logits) is not prefilled: its new tokens ride the decode batch as a one-row branch over
the state's common prefix (Runtime.context_prefix), whose KV is then adopted into the
context (decode_extension_tokens). A cancelled or late request leaves at its next step; a cancelled
prefill stops at its next chunk and hands back the part it computed (PrefillStopped).

Only the scheduler thread touches the runtime, so a runtime stays single-threaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from codecomplete.runtime.base import (
    UNKNOWN_BANNED,
    BranchState,
    ContextState,
    DecodeStep,
    PrefillChunk,
    Runtime,
    TopRows,
)
from codecomplete.sampler import TAIL, TOP_K, pick_many
from codecomplete.sampling import DecodeLoop, GenerationResult, step_through

log = logging.getLogger(__name__)

PREFILL_CHUNK_TOKENS = 512
# a chunk of a prompt that does not finish it is at least this share of the chunk size: a
# few tokens' prefill costs a whole pass over the weights on a GPU
MIN_CHUNK_SHARE = 0.25
GATHER_MS = 5.0
DECODE_EXTENSION_TOKENS = 4
RECORDS_KEPT = 20_000  # the benchmarks read a row's (a record is an object the garbage collector walks)


class PrefillStopped(Exception):
    """A prefill left before its end (cancelled, or past the request's deadline). `state` and
    `logits` are the prefix it computed (None: nothing was; the caller's previous state is
    untouched and still valid)."""

    def __init__(self, state: ContextState | None, logits: np.ndarray | None):
        super().__init__("prefill stopped before its end")
        self.state, self.logits = state, logits


class SchedulerClosed(RuntimeError):
    pass


@dataclass
class IterationRecord:
    """What one scheduler iteration ran (the benchmarks read these)."""

    started: float  # time.perf_counter()
    iteration_ms: float  # gather + small calls + decode + prefill
    decode_ms: float  # the decode_many call (0: no decode this iteration)
    prefill_ms: float
    prefill_tokens: int
    prefill_calls: int
    rows: tuple[int, ...] = ()  # decode rows of each request in the batch
    contexts: tuple[int, ...] = ()  # context tokens of each request
    branch_tokens: tuple[int, ...] = ()  # tokens in each request's branch caches after the step
    gather_ms: float = 0.0  # of iteration_ms: the gather (small calls, waiting for requests to come back)
    fused_tokens: int = 0  # of prefill_tokens: a chunk that rode the decode step (its time is decode_ms's)
    replay_ms: float = 0.0  # of decode_ms: the device's time in the step's graph replays (0: not timed)
    decode_cpu_ms: float = 0.0  # the scheduler thread's CPU time in the decode_many call (the rest of
    # decode_ms is waiting: for the device, or for the GIL while other threads hold it)
    first_picks_ms: float = 0.0  # of iteration_ms: the loops that joined picking their first tokens (from the
    # prompt's logits: reduced rows for a typed token on a reducing runtime, else whole ones)
    joined: int = 0  # loops that joined this iteration
    picks_ms: float = 0.0  # of iteration_ms: the stepped loops' picks, stop rules and next rows after the decode
    picks_cpu_ms: float = 0.0  # the scheduler thread's CPU time in them (picks_ms less this: waiting for the GIL)
    iteration_cpu_ms: float = 0.0  # the scheduler thread's CPU time in the whole iteration (the gather's
    # waits included as the little CPU they take): iteration_ms less this is time off the CPU


@dataclass
class SchedulerStats:
    records: deque = field(default_factory=lambda: deque(maxlen=RECORDS_KEPT))
    failed_calls: int = 0

    def decode_records(self, since: float = 0.0) -> list[IterationRecord]:
        return [r for r in list(self.records) if r.decode_ms > 0 and r.started >= since]

    def reset(self) -> None:
        self.records.clear()
        self.failed_calls = 0


class _Call:
    """One call of a request's thread, answered by the scheduler thread."""

    __slots__ = ("session", "payload", "done", "result", "error")

    def __init__(self, session: ScheduledRuntime, payload):
        self.session, self.payload = session, payload
        self.done = threading.Event()
        self.result = self.error = None


class _Prefill:
    """A prompt being prefilled for one call: by chunks, or through the decode batch."""

    def __init__(self, call: _Call, tokens: list[int], previous: ContextState | None, keep: int):
        self.call, self.tokens = call, tokens
        self.state, self.logits = previous, None  # the prefix computed so far
        self.done = keep  # tokens whose KV the state holds
        self.computed = 0  # the first chunk's computed count plus the later ones
        self.reused: int | None = None  # the first chunk's reused tokens
        self.mode = "new"  # then "extension" (through the decode batch) or "chunks"
        self.branches: BranchState | None = None  # extension: the one-row branch cache
        self.fed = 0  # extension: tokens decoded into it
        self.first_gather = call.session.first_gather  # extension: read with its last token's logits

    @property
    def remaining(self) -> int:
        return len(self.tokens) - self.done


class BatchScheduler:
    """The thread that runs one runtime for many requests (see the module docstring)."""

    def __init__(self, runtime: Runtime, prefill_chunk_tokens: int = PREFILL_CHUNK_TOKENS,
                 gather_ms: float = GATHER_MS, decode_extension_tokens: int = DECODE_EXTENSION_TOKENS,
                 drive_loops: bool = True, fuse_prefill: bool = True):
        """fuse_prefill: while requests decode, a newcomer's prompt chunk rides their step
        where the runtime can (Runtime.fused_chunk_tokens); False: chunks run between steps."""
        if prefill_chunk_tokens < 1:
            raise ValueError("prefill_chunk_tokens must be at least 1")
        self.runtime = runtime
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.gather_s = gather_ms / 1000.0
        self.decode_extension_tokens = decode_extension_tokens if runtime.reuses_branches else 0
        self.drive_loops = drive_loops
        self.fuse_prefill = fuse_prefill
        self.stats = SchedulerStats()
        # the contract's keyword; a runtime without it allocates as it goes
        self._cond = threading.Condition()
        self._ops: list[_Call] = []  # small calls, answered during the gather
        self._decodes: list[_Call] = []
        self._prefills: list[_Prefill] = []
        self._new_loops: list[_Call] = []  # loops handed over, not stepped yet
        self._loops: list[_Call] = []  # driven loops waiting for their next decode (scheduler thread only)
        self._working: set[ScheduledRuntime] = set()  # answered at the last boundary, not back yet
        # the banned ids of the last batch's first loop: what a step without loops reduces its
        # prompt extensions' rows under (UNKNOWN_BANNED before any loop: whole rows)
        self._banned_seen = UNKNOWN_BANNED
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="codecomplete-batch", daemon=True)
        self._thread.start()

    # -- the request side ---------------------------------------------------------------
    def session(self, cancelled: Callable[[], bool] = lambda: False, deadline: float | None = None
                ) -> ScheduledRuntime:
        """A runtime for one request; close it when the request no longer calls it."""
        return ScheduledRuntime(self, cancelled, deadline)

    def _submit(self, call: _Call, kind: str) -> object:
        """Queue a call ("op", "decode" or "prefill") and wait for its answer."""
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the engine's batch scheduler is shut down")
            self._working.discard(call.session)
            if kind == "prefill":
                self._prefills.append(call.payload)
            elif kind == "loop":
                self._new_loops.append(call)
            else:
                (self._decodes if kind == "decode" else self._ops).append(call)
            self._cond.notify_all()
        while not call.done.wait(1.0):
            if not self._thread.is_alive():
                raise SchedulerClosed("the engine's batch scheduler stopped")
        if call.error is not None:
            raise call.error
        return call.result

    def _leave(self, session: ScheduledRuntime) -> None:
        with self._cond:
            self._working.discard(session)
            self._cond.notify_all()

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread: calls still waiting get SchedulerClosed."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the scheduler thread -----------------------------------------------------------------
    def _answer(self, call: _Call, result=None, error: BaseException | None = None, back: bool = True) -> None:
        """back: the request is expected to come back with another call (a finished loop is not)."""
        call.result, call.error = result, error
        if error is not None:
            self.stats.failed_calls += 1
        if back:
            with self._cond:
                if not call.session.closed:
                    self._working.add(call.session)
        call.done.set()

    def _has_work(self) -> bool:
        return bool(self._ops or self._decodes or self._prefills or self._new_loops or self._loops)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._has_work() and not self._closing:
                        self._cond.wait()
                    if self._closing:
                        break
                self._iteration()
        except Exception:  # a scheduler bug: the waiting requests fail instead of hanging
            log.exception("batch scheduler: stopped by an error")
            raise
        finally:
            with self._cond:
                self._closing = True
                pending = (self._ops + self._decodes + [p.call for p in self._prefills] + self._new_loops
                           + self._loops)
                self._ops, self._decodes, self._prefills, self._new_loops, self._loops = [], [], [], [], []
            for call in pending:
                self._answer(call, error=SchedulerClosed("the engine's batch scheduler is shut down"))

    def _iteration(self) -> None:
        t0, cpu0 = time.perf_counter(), time.thread_time()
        self._gather()
        gathered = time.perf_counter()
        with self._cond:
            decodes, self._decodes = self._decodes, []
            new_loops, self._new_loops = self._new_loops, []
            prefills = list(self._prefills)
        self._advance_all(new_loops)  # their first tokens come from the prompt's logits
        joined = time.perf_counter()
        loops, self._loops = self._loops, []
        if not decodes and not prefills and not loops:  # the gather answered small calls only
            return
        record = IterationRecord(started=t0, iteration_ms=0.0, decode_ms=0.0, prefill_ms=0.0, prefill_tokens=0,
                                 prefill_calls=0, gather_ms=(gathered - t0) * 1000.0,
                                 first_picks_ms=(joined - gathered) * 1000.0, joined=len(new_loops))
        self.stats.records.append(record)  # before any answer: a request sees its own step recorded
        extensions, chunked = [], []
        for job in prefills:
            if self._stopping(job):
                computed = job.computed > 0
                self._finish_prefill(job, error=PrefillStopped(job.state if computed else None,
                                                               job.logits if computed else None))
                continue
            if job.mode == "new":
                try:
                    self._start(job)
                except Exception as e:
                    self._finish_prefill(job, error=e)
                    continue
            (extensions if job.mode == "extension" else chunked).append(job)
        fused = None
        if chunked and (decodes or extensions or loops) and self.fuse_prefill and self.runtime.fused_chunk_tokens:
            fused = min(chunked, key=lambda j: j.remaining)
        if decodes or extensions or loops:
            self._decode(decodes, extensions, loops, record, fused)
        if chunked and fused is None:
            self._prefill(chunked, record)
        record.iteration_ms = (time.perf_counter() - t0) * 1000.0
        record.iteration_cpu_ms = (time.thread_time() - cpu0) * 1000.0

    def _gather(self) -> None:
        """Answer small calls until every request answered at the last step boundary is back
        with its next call, or gather_ms have passed."""
        deadline = time.perf_counter() + self.gather_s
        while True:
            with self._cond:
                ops, self._ops = self._ops, []
                if not ops:
                    now = time.perf_counter()
                    if not self._working or self._closing or now >= deadline:
                        return
                    self._cond.wait(deadline - now)
                    continue
            for call in ops:
                try:
                    self._answer(call, call.payload(self.runtime))
                except Exception as e:  # the request's own error: its thread raises it
                    self._answer(call, error=e)

    def _advance(self, call: _Call, picks: list[tuple[int, float]] | None = None) -> None:
        """Sample a driven loop's next tokens (its first step's picks made already, when
        given): it waits for the next decode, or it is done."""
        loop: DecodeLoop = call.payload
        try:
            going = loop.sample(picks)
            while going:
                if loop.prepare():
                    self._loops.append(call)
                    return
                going = loop.sample()
            result = loop.result()
        except Exception as e:  # the request's own error (or its runtime call's): its thread raises it
            self._answer(call, error=e, back=False)
            return
        self._answer(call, result, back=False)

    def _decode(self, decodes: list[_Call], extensions: list[_Prefill], loops: list[_Call],
                record: IterationRecord, fused: _Prefill | None = None) -> None:
        """fused: the prompt whose next chunk rides this step."""
        runtime = self.runtime
        steps, owners = [], []
        for call in decodes:
            step: DecodeStep = call.payload
            try:
                runtime.check_decode(step.context, step.branches, step.next_tokens)
            except Exception as e:
                self._answer(call, error=e)
                continue
            steps.append(step)
            owners.append(call)
        n_calls = len(owners)
        reducing = runtime.reduces_rows
        for call in loops:
            loop: DecodeLoop = call.payload
            try:
                runtime.check_decode(loop.context, loop.branches, loop.next_tokens)
            except Exception as e:
                self._answer(call, error=e, back=False)
                continue
            steps.append(DecodeStep(loop.context, loop.branches, loop.next_tokens,
                                    loop.next_gathers() if reducing else None))
            owners.append(call)
        n_loops = len(owners) - n_calls
        for job in extensions:
            at = len(job.state.tokens) + job.fed
            last = at == len(job.tokens) - 1  # its logits start the request's loop
            gather = {0: job.first_gather} if last and reducing and job.first_gather is not None else None
            steps.append(DecodeStep(job.state, job.branches, [job.tokens[at]], gather))
            owners.append(job)
        if not steps:
            if fused is not None:
                self._prefill([fused], record)
            return
        chunk = None
        if fused is not None:
            end = fused.done + min(fused.remaining, self.runtime.fused_chunk_tokens)
            chunk = PrefillChunk(fused.tokens[:end], fused.state, capacity_tokens=len(fused.tokens))
        graphs = getattr(self.runtime, "graphs", None)  # the torch runtime's DecodeGraphs, timing its replays
        replayed = getattr(graphs, "replay_ms", None)
        cpu0 = time.thread_time()
        t0 = time.perf_counter()
        try:
            logits = self._run_steps(steps, owners[n_calls:n_calls + n_loops], n_calls, chunk)
            if len(logits) != len(steps):
                raise RuntimeError(f"decode_many returned {len(logits)} results for {len(steps)} steps")
        except Exception as e:  # the runtime failed the whole batch: each of its requests fails
            log.exception("batch scheduler: decode_many of %d steps failed", len(steps))
            if fused is not None:
                self._finish_prefill(fused, error=e)
            for i, owner in enumerate(owners):
                if isinstance(owner, _Prefill):
                    self._finish_prefill(owner, error=e)
                else:
                    self._answer(owner, error=e, back=not n_calls <= i < n_calls + n_loops)
            return
        record.rows = tuple(s.branches.n for s in steps)
        record.contexts = tuple(len(s.context.tokens) for s in steps)
        record.branch_tokens = tuple(s.branches.step for s in steps)
        record.decode_ms = (time.perf_counter() - t0) * 1000.0
        record.decode_cpu_ms = (time.thread_time() - cpu0) * 1000.0
        if replayed is not None:
            record.replay_ms = graphs.replay_ms - replayed
        if fused is not None:
            n = len(chunk.tokens) - fused.done
            self._chunk_done(fused, chunk.state, chunk.logits, len(chunk.tokens))
            record.prefill_tokens += n
            record.prefill_calls += 1
            record.fused_tokens += n if chunk.fused else 0
        for i, (owner, out) in enumerate(zip(owners, logits, strict=True)):
            if isinstance(owner, _Prefill):
                self._extended(owner, out)
            elif n_calls <= i < n_calls + n_loops:
                owner.payload.accept(out)
            else:
                self._answer(owner, out)
        t1, c1 = time.perf_counter(), time.thread_time()
        self._advance_all(owners[n_calls:n_calls + n_loops])
        record.picks_ms = (time.perf_counter() - t1) * 1000.0
        record.picks_cpu_ms = (time.thread_time() - c1) * 1000.0

    def _advance_all(self, loops: list[_Call]) -> None:
        """_advance every loop of a step, the picks over reduced rows made in one pick_many."""
        together, wants = [], []
        for call in loops:
            want = call.payload.step_picks()
            if want is not None:
                together.append(call)
                wants.append((call.payload.sampler, call.payload.logits, want))
        try:
            picked = dict(zip(map(id, together), pick_many(wants), strict=True))
        except Exception:  # a bad row in the batch: each loop picks on its own, its error its own
            log.exception("batch scheduler: pick_many failed; picking per request")
            picked = {}
        for call in loops:
            self._advance(call, picked.get(id(call)))

    def _run_steps(self, steps: list[DecodeStep], loops: list[_Call], first_loop: int,
                   chunk: PrefillChunk | None = None) -> list:
        """decode_many; where the runtime reduces rows on its device, the driven loops'
        steps come back reduced (TopRows; a pick constrained by token alignment gathers the
        few logits it reads from them), except those that ban other ids than the first such
        loop. chunk: rides the step."""
        runtime = self.runtime
        fused = {"chunk": chunk} if chunk is not None else {}
        if loops:
            self._banned_seen = loops[0].payload.sampler.banned
        if not runtime.reduces_rows or self._banned_seen is UNKNOWN_BANNED:
            return runtime.decode_many(steps, **fused)
        banned = self._banned_seen
        full = [True] * len(steps)
        for i, call in enumerate(loops):
            loop: DecodeLoop = call.payload
            full[first_loop + i] = loop.sampler.banned is not banned
        for i in range(first_loop + len(loops), len(steps)):  # prompt extensions: their logits start a loop
            full[i] = False
        return runtime.decode_many_top(steps, full, banned, TOP_K, TAIL, **fused)

    # -- prefill ----------------------------------------------------------------------------
    def _stopping(self, job: _Prefill) -> bool:
        session = job.call.session
        return session.cancelled() or (session.deadline is not None and time.monotonic() > session.deadline)

    def _finish_prefill(self, job: _Prefill, result=None, error: BaseException | None = None) -> None:
        with self._cond:
            if job in self._prefills:
                self._prefills.remove(job)
        self._answer(job.call, result, error)

    def _start(self, job: _Prefill) -> None:
        """The first look at a new prompt: through the decode batch when it differs from its
        previous state in a few last tokens (typed, or rewritten: a backspace, a back-off
        that moved, the same prompt again whose last token is computed for its logits), else
        by chunks. A chunk of a few tokens would cost a whole chunk's pass where chunks ride
        the step (the CUDA graphs' fixed chunk shape)."""
        previous, tokens, keep = job.state, job.tokens, job.done
        ext = len(tokens) - keep
        job.mode = "chunks"
        if previous is None or not keep or not 0 < ext <= self.decode_extension_tokens:
            return
        base = previous if keep == len(previous.tokens) else self.runtime.context_prefix(previous, keep)
        if base is None:
            return
        job.state = base
        job.branches = self.runtime.start_branches(base, 1, ext)
        job.mode = "extension"

    def _extended(self, job: _Prefill, logits: np.ndarray) -> None:
        """One extension token decoded; after the last, its KV joins the context."""
        job.fed += 1
        previous = job.state
        fed = job.tokens[len(previous.tokens):]
        if job.fed < len(fed):
            return
        try:
            state = self.runtime.adopt(previous, job.branches, 0, fed)
        except Exception as e:
            self._finish_prefill(job, error=e)
            return
        job.branches, job.mode = None, "chunks"
        if state is None:  # no room in the context's buffer: prefill the tokens instead
            return
        state.reused_tokens, state.new_tokens, state.adopted_tokens = len(previous.tokens), len(fed), 0
        # reduced rows stay reduced: the request's loop picks its first tokens from them with
        # the others' (pick_many), and reads the whole row only if it bans other ids
        first = logits if isinstance(logits, TopRows) else np.asarray(logits[0], dtype=np.float32)
        self._finish_prefill(job, (state, first))

    def _prefill(self, jobs: list[_Prefill], record: IterationRecord) -> None:
        """Up to prefill_chunk_tokens of the waiting prompts, shortest first."""
        budget = self.prefill_chunk_tokens
        min_chunk = max(1, int(self.prefill_chunk_tokens * MIN_CHUNK_SHARE))
        t0 = time.perf_counter()
        for job in sorted(jobs, key=lambda j: j.remaining):
            n = min(job.remaining, budget)
            if n < job.remaining and n < min_chunk and budget < self.prefill_chunk_tokens:
                break  # what is left of the budget is too small a chunk (the longer prompts wait)
            try:
                self._chunk(job, job.done + n)
            except Exception as e:
                self._finish_prefill(job, error=e)
                continue
            budget -= n
            record.prefill_tokens += n
            record.prefill_calls += 1
        record.prefill_ms += (time.perf_counter() - t0) * 1000.0

    def _chunk(self, job: _Prefill, end: int) -> None:
        state, logits = self.runtime.prefill(job.tokens[:end], job.state, capacity_tokens=len(job.tokens))
        self._chunk_done(job, state, logits, end)

    def _chunk_done(self, job: _Prefill, state: ContextState, logits: np.ndarray, end: int) -> None:
        """A chunk to `end` computed: the job's prefix moves on; the last one answers it."""
        if job.reused is None:
            job.reused = state.reused_tokens
        job.computed += state.new_tokens
        job.state, job.logits, job.done = state, logits, end
        if job.remaining == 0:
            state.reused_tokens, state.new_tokens, state.adopted_tokens = job.reused, job.computed, 0
            self._finish_prefill(job, (state, job.logits))


class ScheduledRuntime(Runtime):
    """One request's runtime while batching: the same calls as the scheduler's runtime, each
    run on the scheduler thread (decode joins the next batch; prefill is chunked)."""

    def __init__(self, scheduler: BatchScheduler, cancelled: Callable[[], bool], deadline: float | None):
        runtime = scheduler.runtime
        self._scheduler, self._runtime = scheduler, runtime
        self.cancelled, self.deadline = cancelled, deadline
        self.name, self.config, self.tokenizer = runtime.name, runtime.config, runtime.tokenizer
        self.reuses_branches = runtime.reuses_branches
        self.batch_attention = runtime.batch_attention
        self.closed = False
        # the ids the request's first constrained pick reads from its prompt's last logits:
        # a prompt that rides the decode batch fetches them with the step (DecodeStep.gather)
        self.first_gather: np.ndarray | None = None

    def _op(self, fn: Callable[[Runtime], object]):
        return self._scheduler._submit(_Call(self, fn), "op")

    def prefill(self, tokens: Sequence[int], previous: ContextState | None = None, *,
                capacity_tokens: int | None = None) -> tuple[ContextState, np.ndarray]:
        """The runtime's prefill, by chunks between decode steps; PrefillStopped when the
        request is cancelled or late before its end."""
        tokens = self._runtime.check_prefill(tokens)
        call = _Call(self, None)
        call.payload = _Prefill(call, tokens, previous, self._runtime.reuse_split(tokens, previous))
        return self._scheduler._submit(call, "prefill")

    def decode(self, context, branches, next_tokens):
        step = DecodeStep(context, branches, list(next_tokens))
        return self._scheduler._submit(_Call(self, step), "decode")

    def run_loop(self, loop: DecodeLoop) -> GenerationResult:
        """Step a decode loop to its end on the scheduler thread (sampling.run's hook); its
        runtime calls go to the scheduler's runtime directly."""
        if not self._scheduler.drive_loops:
            return step_through(loop)
        loop.runtime = self._runtime
        return self._scheduler._submit(_Call(self, loop), "loop")

    def start_branches(self, context, n, max_new_tokens):
        return self._op(lambda rt: rt.start_branches(context, n, max_new_tokens))

    def select_branches(self, branches, keep):
        return self._op(lambda rt: rt.select_branches(branches, keep))

    def adopt(self, context, branches, row, tokens, start=0):
        return self._op(lambda rt: rt.adopt(context, branches, row, tokens, start))

    def branch_from(self, context, branches, rows, start, steps, max_new_tokens):
        return self._op(lambda rt: rt.branch_from(context, branches, rows, start, steps, max_new_tokens))

    def describe(self) -> dict:
        return self._runtime.describe()

    def close(self) -> None:
        """This request makes no more calls: the scheduler stops waiting for it."""
        self.closed = True
        self._scheduler._leave(self)

    def __enter__(self) -> ScheduledRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DocumentTurns:
    """One request at a time per document key (its kept KV state and prompt memo are taken
    by one request at a time); different documents go on together."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextmanager
    def turn(self, key: str):
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]


__all__ = ["BatchScheduler", "DocumentTurns", "IterationRecord", "PrefillStopped", "ScheduledRuntime",
           "SchedulerClosed", "SchedulerStats"]
