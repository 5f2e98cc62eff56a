"""What goes into the engine and what comes out: plain dataclasses, no model types."""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Neighbour:
    """Another open document whose snippets may help the prompt."""

    path: str
    text: str
    language: str = ""


ANSWER_MARGIN_MS = 20.0  # decoding stops this long before the deadline: time to post-process and answer

# the --back-off choices of eval and bench: the value of CompletionOptions.back_off_needed
BACK_OFF_RULES: dict[str, bool | None] = {"model": None, "needed": True, "fixed": False}


@dataclass
class CompletionOptions:
    n: int = 4  # candidates to draw (candidate 0 greedy, the rest sampled)
    max_new_tokens: int = 48
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    align: bool = True  # token alignment for a cursor inside a token
    back_off_tokens: int = 3
    # back off only as far as a token of the finished text could start (False: always
    # back_off_tokens, as the paper does; each extra token is one more decode step);
    # None: the model's own setting (ModelConfig.align_back_off)
    back_off_needed: bool | None = None
    rerank: bool = True
    multiline: bool | None = None  # None: decided from the syntax at the cursor
    deadline_ms: float = 1000.0
    # after the greedy candidate ends, the sampled ones get this many more decode steps
    # (None: wait for all); an unfinished one is dropped from one-line answers
    patience_steps: int | None = 4
    prefix_tokens: int = 768  # budgets; the runtime's context caps the sum
    suffix_tokens: int = 256
    neighbour_tokens: int = 256


class CancelToken:
    """Set from another thread; the decode loop checks it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    # a request crosses process boundaries (parallel eval): the copy starts in the same state
    def __getstate__(self) -> dict:
        return {"cancelled": self.cancelled}  # a dict: a false state would skip __setstate__

    def __setstate__(self, state: dict) -> None:
        self._event = threading.Event()
        if state["cancelled"]:
            self._event.set()


class StopReason(enum.StrEnum):
    """Why a candidate ended (the values are what JSON and the logs carry)."""

    EOS = "eos"  # the model emitted an end or sentinel token
    STOP = "stop"  # the scope's stop rule ended the line or block
    MAX_TOKENS = "max_tokens"
    DEADLINE = "deadline"
    PATIENCE = "patience"  # the greedy candidate had ended some steps before
    CANCELLED = "cancelled"
    CACHED = "cached"  # the rest of a candidate shown before (typing-as-suggested)


@dataclass
class CompletionRequest:
    text: str  # the whole document
    offset: int  # cursor, in characters (Python str index) into text
    language: str = ""  # LSP languageId; guessed from path when empty
    path: str = ""
    neighbours: list[Neighbour] = field(default_factory=list)
    options: CompletionOptions = field(default_factory=CompletionOptions)
    cancel: CancelToken = field(default_factory=CancelToken)
    # absolute time.monotonic() seconds by which the answer is due, stamped once by whoever
    # receives the request (the language server on arrival); None: the engine stamps
    # now + options.deadline_ms when it starts
    deadline: float | None = None

    def due(self, now: float | None = None) -> float:
        """The absolute deadline: the stamped one, else now (time.monotonic()) plus
        options.deadline_ms (the CLI and eval leave it unset and get this)."""
        if self.deadline is not None:
            return self.deadline
        return (time.monotonic() if now is None else now) + self.options.deadline_ms / 1000.0

    def decode_deadline(self, now: float | None = None) -> float:
        """Until when (time.monotonic()) the model may decode: the deadline less ANSWER_MARGIN_MS."""
        return self.due(now) - ANSWER_MARGIN_MS / 1000.0

    @property
    def prefix(self) -> str:
        return self.text[: self.offset]

    @property
    def suffix(self) -> str:
        return self.text[self.offset :]


@dataclass
class Candidate:
    text: str  # what to insert at the cursor
    score: float = 0.0  # final rank score, higher is better
    logprob: float = 0.0  # mean log-probability of the generated tokens
    syntax_ok: bool = True
    score_parts: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # tokens generated for it
    stop_reason: str = ""  # a StopReason value


@dataclass
class Completion:
    candidates: list[Candidate]
    timings_ms: dict[str, float] = field(default_factory=dict)
    tokens_generated: int = 0
    model_calls: int = 0
    cached: bool = False  # served from the typing-as-suggested cache
    prefill_reused_tokens: int = 0
    prefill_new_tokens: int = 0
    prefill_adopted_tokens: int = 0  # prompt tokens whose KV came from the last request's branches
    cancelled: bool = False
    decode_rows: int = 0  # runtime rows decoded (candidates with equal tokens share one)
    branch_rows: int = 0  # the rows that would have been decoded without that sharing

    @property
    def source(self) -> str:
        """How the answer was made: "cache" (typing-as-suggested), "warm" (the model ran with
        its prefix KV reused) or "cold" (a full prefill)."""
        return "cache" if self.cached else "warm" if self.prefill_reused_tokens > 0 else "cold"
