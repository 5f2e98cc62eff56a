"""Affinity routing: each session's requests go to the replica holding its KV cache.

A keystroke's request is cheap only on the replica that served the document's last
request (prefix KV reuse, branch adoption, the typing-as-suggested cache live there). So a
session key (the client's, or the API key's name + the file) sticks to the replica that
served it, while that replica is not overloaded: its queue no more than
`imbalance_requests` longer than the shortest one. Otherwise, and for a new session, the
power of two choices: two random replicas, a not overloaded one first, then the one owning
fewer sessions (so typists spread over the replicas), then the shorter queue.

The session is the `session` keyword of a call one replica hands on to another, or the
proxy's session (Ray Serve's X-Session-Id header). An HTTP request with neither goes to the
entry replica (the lowest replica id when the router starts, so every proxy's router picks
the same one, and kept while it runs): it reads the session key from the body and hands the
request on, and the owners of those sessions are remembered in one place, its router.

Across autoscaling: a replica that is added owns no session, so new sessions (and those
moved off an overloaded replica) go to it first; the entry stays where it is, so its table
of owners stays too. A replica that goes away (scaled down, or lost) takes its sessions
along: they are forgotten, and each one's next request runs cold once on another replica.
If the entry replica itself goes away, the next lowest id becomes the entry and the body
sessions start a new table there (each runs cold once).
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

DEFAULT_IMBALANCE_REQUESTS = 4
MAX_SESSIONS = 65536  # owners remembered; the oldest session is forgotten first


def session_of(pending: PendingRequest | None) -> str:
    """The `session` keyword argument of a handed-on call, else the proxy's session ("" if none)."""
    if pending is None:
        return ""
    session = (pending.kwargs or {}).get("session", "")
    if not session:
        session = getattr(pending.metadata, "session_id", "")  # absent in older Ray Serve
    return session if isinstance(session, str) else ""


def is_http(pending: PendingRequest | None) -> bool:
    return pending is not None and bool(getattr(pending.metadata, "is_http_request", False))


def entry_first(candidates: Sequence[Hashable], queue_lens: dict[Hashable, int | None],
                rng: random.Random, current: Hashable | None = None) -> list[list[Hashable]]:
    """[entry], then two others by queue, for an HTTP request without a session: the entry
    is `current` while it is a candidate, else the lowest id (the same for every router
    instance); the others only if it is full."""
    if not candidates:
        return []
    entry = current if current in candidates else min(candidates, key=str)
    rest = [c for c in candidates if c != entry]
    picked = rng.sample(rest, min(2, len(rest)))
    return [[entry], *([c] for c in sorted(picked, key=lambda c: queue_lens.get(c) or 0))]


def any_replica(candidates: Sequence[Hashable], queue_lens: dict[Hashable, int | None],
                rng: random.Random) -> list[list[Hashable]]:
    """Two random candidates, the shorter queue first (a tie either way), one per rank."""
    picked = rng.sample(list(candidates), min(2, len(candidates)))
    return [[c] for c in sorted(picked, key=lambda c: queue_lens.get(c) or 0)]


def choose_for_session(owner: Hashable | None, candidates: Sequence[Hashable],
                       queue_lens: dict[Hashable, int | None], sessions_owned: dict[Hashable, int],
                       imbalance_requests: int, rng: random.Random) -> list[list[Hashable]]:
    """Ranked replica ids for one request, one replica per rank (Ray Serve tries a rank's
    replicas by its own queue-length cache, where a replica it has not probed yet loses to
    any it has: one per rank keeps the choice ours): [owner] first while the owner is a
    candidate and not overloaded, then two random candidates, best first (see the module).
    An unknown queue length counts as empty (the router probes it before sending)."""
    if not candidates:
        return []
    queue = {c: queue_lens.get(c) or 0 for c in candidates}
    shortest = min(queue.values())
    # drawn in random order, so that ties go either way. A new session goes to the one owning
    # fewer sessions unless its queue is overloaded: the queue of the moment says little about
    # the keystrokes a session will bring (and the entry replica's queue holds the requests it
    # is handing on)
    picked = rng.sample(list(candidates), min(2, len(candidates)))
    fallback = sorted(picked, key=lambda c: (queue[c] - shortest > imbalance_requests,
                                             sessions_owned.get(c, 0), queue[c]))
    if owner in queue and queue[owner] - shortest <= imbalance_requests:
        return [[owner], *([c] for c in fallback if c != owner)]
    return [[c] for c in fallback]


class SessionAffinityRouter(RequestRouter):
    """Ray Serve request router: session key -> the replica that served it last."""

    def initialize_state(self, imbalance_requests: int = DEFAULT_IMBALANCE_REQUESTS, **kwargs) -> None:
        self.imbalance_requests = imbalance_requests
        self._owners: OrderedDict[str, ReplicaID] = OrderedDict()
        self._sessions_owned: dict[ReplicaID, int] = {}
        self._entry: ReplicaID | None = None
        self._rng = random.Random()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id: r for r in candidate_replicas}
        session = session_of(pending_request)
        queue_lens = {rid: self.replica_queue_len_cache.get(rid) for rid in by_id}
        if session:
            ranks = choose_for_session(self._owners.get(session), list(by_id), queue_lens, self._sessions_owned,
                                       self.imbalance_requests, self._rng)
        elif is_http(pending_request):
            ranks = entry_first(list(by_id), queue_lens, self._rng, self._entry)
            self._entry = ranks[0][0] if ranks else None
        else:  # a call that belongs to no session (describe): any replica
            ranks = any_replica(list(by_id), queue_lens, self._rng)
        if pending_request is not None:
            # every rank full: wait before asking again, instead of spinning
            pending_request.routing_context.should_backoff = True
        return [[by_id[rid] for rid in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        session = session_of(pending_request)
        if not session:
            return
        previous = self._owners.pop(session, None)
        if previous is not None:
            self._release(previous)
        self._owners[session] = replica_id
        self._sessions_owned[replica_id] = self._sessions_owned.get(replica_id, 0) + 1
        while len(self._owners) > MAX_SESSIONS:
            _, oldest = self._owners.popitem(last=False)
            self._release(oldest)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray Serve's new set of replicas (autoscaling, a restart): the sessions of those gone are forgotten."""
        super().update_replicas(replicas)
        running = {r.replica_id for r in replicas}
        for gone in [rid for rid in self._sessions_owned if rid not in running]:
            self._forget_replica(gone)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget_replica(replica_id)

    def _forget_replica(self, replica_id: ReplicaID) -> None:
        for session in [s for s, rid in self._owners.items() if rid == replica_id]:
            del self._owners[session]
        self._sessions_owned.pop(replica_id, None)

    def _release(self, replica_id: ReplicaID) -> None:
        count = self._sessions_owned.get(replica_id, 0) - 1
        if count > 0:
            self._sessions_owned[replica_id] = count
        else:
            self._sessions_owned.pop(replica_id, None)
