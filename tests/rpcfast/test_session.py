"""The sans-IO session core over a simulated link: loss, duplication, reordering and delay
driven by an explicit clock and each core's next_deadline(); nothing sleeps."""

from __future__ import annotations

import array
import functools
import heapq
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rpcfast._session import (
    _ABORT,
    _ALL_DATA,
    _DATA,
    _FAST,
    _FROM_CLIENT,
    _GRANT,
    _HEADER,
    _MAGIC,
    _RESPONSE_HEAD,
    EV_ABORTED,
    EV_FAILED,
    EV_REQUEST,
    EV_RESPONSE,
    HEADER_SIZE,
    SessionConfig,
    SessionCore,
)
from rpcfast._types import Buffer

Event = tuple[int, Any, Any]
Handler = Callable[[Event], None]


def frag_of(config: SessionConfig) -> int:
    return (config.max_datagram - HEADER_SIZE) // 8 * 8


def packet(
    kind: int,
    flags: int,
    length: int,
    cid: int,
    seq: int,
    offset: int = 0,
    frag: int = 0,
    ack: int = 0,
    payload: bytes = b"",
) -> bytes:
    return _HEADER.pack(_MAGIC, kind, flags, 0, length, cid, seq, offset, frag, ack) + payload


class Link:
    """Joins cores by name. Drops (seeded rate, or by send index), duplicates and delays each
    datagram (jitter reorders). Checks flow control on every send: the payload bytes of one
    message on the link never exceed the sender's window plus one datagram."""

    def __init__(
        self,
        *,
        seed: int = 0,
        loss: float = 0.0,
        dup: float = 0.0,
        delay: float = 0.0005,
        jitter: float = 0.0,
        drop: frozenset[int] = frozenset(),
        check_flow: bool = True,
    ) -> None:
        self.check_flow = check_flow
        self.rng = random.Random(seed)
        self.loss = loss
        self.dup = dup
        self.delay = delay
        self.jitter = jitter
        self.drop = drop
        self.now = 0.0
        self.cores: dict[str, SessionCore] = {}
        self.handlers: dict[str, Handler] = {}
        self.sent: list[tuple[str, str, bytes]] = []
        self.inflight: dict[tuple[str, int, int, int], int] = {}
        self.peak_inflight = 0
        self._queue: list[tuple[float, int, str, str, bytes, int]] = []
        # a data datagram on the wire (either copy, if duplicated): its message key and size
        self._on_wire: dict[int, tuple[tuple[str, int, int, int], int]] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._n = 0

    def attach(self, name: str, core: SessionCore, handler: Handler | None = None) -> None:
        self.cores[name] = core
        self.handlers[name] = handler if handler is not None else (lambda ev: None)

    def later(self, delay: float, action: Callable[[], None]) -> None:
        self._n += 1
        heapq.heappush(self._timers, (self.now + delay, self._n, action))

    def inject(self, src: str, dst: str, data: bytes) -> None:
        """Deliver ``data`` now, outside the loss model."""
        self.cores[dst].receive(data, src, self.now)
        self._settle()

    def _settle(self) -> None:
        """Hand out events and put every queued datagram on the wire."""
        busy = True
        while busy:
            busy = False
            for name, core in self.cores.items():
                while core.events:
                    busy = True
                    self.handlers[name](core.events.popleft())
                while core.outbox:
                    busy = True
                    dst, buffers = core.outbox.popleft()
                    self._send(name, dst, b"".join(buffers))

    def _send(self, src: str, dst: Any, data: bytes) -> None:
        index = len(self.sent)
        self.sent.append((src, dst, data))
        key = None
        size = len(data) - HEADER_SIZE
        if data[1] in (_ALL_DATA, _DATA):
            fields = _HEADER.unpack_from(data)
            key = (src, fields[5], fields[6], fields[2] & _FROM_CLIENT)
            total = self.inflight.get(key, 0) + size
            self.inflight[key] = total
            self.peak_inflight = max(self.peak_inflight, total)
            config = self.cores[src].config
            limit = config.window_bytes + config.max_datagram - HEADER_SIZE
            assert total <= limit or not self.check_flow, (
                f"{total} bytes of one message in flight, limit {limit}"
            )
        if index in self.drop or self.rng.random() < self.loss:
            if key is not None:
                self.inflight[key] -= size
            return
        if key is not None:
            self._on_wire[index] = (key, size)
        self._push(src, dst, data, index)
        if self.rng.random() < self.dup:
            self._push(src, dst, data, index)

    def _push(self, src: str, dst: str, data: bytes, index: int) -> None:
        self._n += 1
        at = self.now + self.delay + self.rng.uniform(0.0, self.jitter)
        heapq.heappush(self._queue, (at, self._n, src, dst, data, index))

    def next_time(self) -> float | None:
        times = [core.next_deadline() for core in self.cores.values()]
        if self._queue:
            times.append(self._queue[0][0])
        if self._timers:
            times.append(self._timers[0][0])
        present = [t for t in times if t is not None]
        return min(present) if present else None

    def step(self, limit: float) -> bool:
        """Advance to the next event at or before ``limit``; False if there is none."""
        self._settle()
        at = self.next_time()
        if at is None or at > limit:
            return False
        self.now = max(self.now, at)
        now = self.now
        while self._queue and self._queue[0][0] <= now:
            _, _, src, dst, data, index = heapq.heappop(self._queue)
            landed = self._on_wire.pop(index, None)  # the first copy to arrive lands the bytes
            if landed is not None:
                self.inflight[landed[0]] -= landed[1]
            core = self.cores.get(dst)
            if core is not None:  # strangers in the fuzz tests are black holes
                core.receive(data, src, now)
            self._settle()
        while self._timers and self._timers[0][0] <= now:
            heapq.heappop(self._timers)[2]()
            self._settle()
        for core in self.cores.values():
            deadline = core.next_deadline()
            if deadline is not None and deadline <= now:
                core.on_timer(now)
                self._settle()
        return True

    def run_until(self, done: Callable[[], bool], *, max_time: float, steps: int = 500_000) -> None:
        for _ in range(steps):
            self._settle()
            if done():
                return
            if not self.step(max_time):
                raise AssertionError(f"not done by simulated time {max_time} (now {self.now})")
        raise AssertionError("step budget exhausted")

    def advance(self, until: float, steps: int = 500_000) -> None:
        for _ in range(steps):
            if not self.step(until):
                self.now = max(self.now, until)
                return
        raise AssertionError("step budget exhausted")

    def idle(self) -> bool:
        return not self._queue and not self._timers and self.next_time() is None


class Client:
    """Records what one client core hears."""

    def __init__(self) -> None:
        self.responses: dict[int, bytes] = {}
        self.failures: dict[int, str] = {}
        self.times: dict[int, float] = {}
        self.served: list[Event] = []
        self.link: Link | None = None

    def __call__(self, ev: Event) -> None:
        kind, rpc_id, payload = ev
        if kind in (EV_REQUEST, EV_ABORTED):  # forged requests in the fuzz tests
            self.served.append(ev)
            return
        assert rpc_id not in self.responses and rpc_id not in self.failures
        if self.link is not None:
            self.times[rpc_id] = self.link.now
        if kind == EV_RESPONSE:
            self.responses[rpc_id] = bytes(payload)
        elif kind == EV_FAILED:
            self.failures[rpc_id] = payload
        else:
            raise AssertionError(f"unknown event {ev}")


class Server:
    """Answers each request with ``answer(token, payload)`` after ``delay`` (None: never)."""

    def __init__(
        self,
        link: Link,
        name: str,
        answer: Callable[[Any, memoryview], list[Buffer]] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.link = link
        self.name = name
        self.answer = answer
        self.delay = delay
        self.requests: dict[Any, int] = {}
        self.payloads: dict[Any, bytes] = {}
        self.aborted: list[Any] = []
        self.reply_times: dict[Any, float] = {}

    def __call__(self, ev: Event) -> None:
        kind, token, payload = ev
        if kind == EV_ABORTED:
            self.aborted.append(token)
            return
        assert kind == EV_REQUEST
        self.requests[token] = self.requests.get(token, 0) + 1
        self.payloads[token] = bytes(payload)
        answer = self.answer
        if answer is None:
            return
        message = answer(token, payload)
        core = self.link.cores[self.name]

        def send() -> None:
            self.reply_times[token] = self.link.now
            core.reply(token, message, self.link.now)

        if self.delay:
            self.link.later(self.delay, send)
        else:
            send()


def echo(token: Any, payload: memoryview) -> list[Buffer]:
    return [payload]


def blob(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def split3(data: bytes) -> list[Buffer]:
    """A scatter list with uneven pieces and an empty one, as drivers will pass."""
    a, b = len(data) // 3, 2 * len(data) // 3 + 1
    return [bytearray(data[:a]), b"", memoryview(data)[a:b], data[b:]]


def pair(
    link: Link,
    client_config: SessionConfig,
    server_config: SessionConfig | None = None,
    answer: Callable[[Any, memoryview], list[Buffer]] | None = echo,
    delay: float = 0.0,
) -> tuple[SessionCore, Client, SessionCore, Server]:
    client = SessionCore(client_config, client_id=0x1111)
    server = SessionCore(server_config or client_config, client_id=0x5555)
    heard = Client()
    heard.link = link
    app = Server(link, "S", answer, delay)
    link.attach("C", client, heard)
    link.attach("S", server, app)
    return client, heard, server, app


# -- property: every call completes exactly once over a bad link --------------------------------

SIZES = st.one_of(st.integers(0, 3000), st.integers(3000, 100_000), st.integers(100_000, 3_000_000))


@settings(max_examples=60, deadline=None)
@example(  # always run a few megabytes each way through a really bad link
    seed=1,
    loss=0.3,
    dup=0.1,
    jitter=0.0035,
    drop=frozenset({0, 1, 2}),
    max_datagram=1472,
    handler_delay=0.03,
    calls=[("A", 3_000_000, 2_000_000, 0.0), ("B", 0, 2_500_000, 0.001), ("A", 10, 10, 0.002)],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.one_of(st.sampled_from([0.0, 0.05, 0.3]), st.floats(0.0, 0.4)),
    dup=st.floats(0.0, 0.2),
    jitter=st.floats(0.0, 0.0035),  # round trips stay under resend_interval
    drop=st.frozensets(st.integers(0, 40), max_size=8),
    max_datagram=st.sampled_from([256, 1472, 9000]),
    handler_delay=st.sampled_from([0.0, 0.004, 0.03]),
    calls=st.lists(
        st.tuples(st.sampled_from(["A", "B"]), SIZES, SIZES, st.floats(0.0, 0.03)),
        min_size=1,
        max_size=4,
    ),
)
def test_every_call_completes_with_its_response_and_runs_once(
    seed: int,
    loss: float,
    dup: float,
    jitter: float,
    drop: frozenset[int],
    max_datagram: int,
    handler_delay: float,
    calls: list[tuple[str, int, int, float]],
) -> None:
    config = SessionConfig(
        max_datagram=max_datagram,
        window_bytes=max(64 * 1024, 4 * max_datagram),
        abort_after=5.0,
        response_keep=5.0,
    )
    cap = 100_000 if max_datagram < 1000 else 3_000_000
    link = Link(seed=seed, loss=loss, dup=dup, jitter=jitter, drop=drop)
    clients = {name: SessionCore(config, client_id=n + 1) for n, name in enumerate("AB")}
    heard = {name: Client() for name in clients}
    expected: dict[tuple[str, int], tuple[bytes, bytes]] = {}

    def answer(token: Any, payload: memoryview) -> list[Buffer]:
        request, response = expected[(token[0], token[2])]
        assert bytes(payload) == request
        return split3(response)

    server = SessionCore(config, client_id=99)
    app = Server(link, "S", answer, handler_delay)
    link.attach("S", server, app)
    for name, core in clients.items():
        link.attach(name, core, heard[name])

    for n, (name, req_size, resp_size, at) in enumerate(calls):
        request = blob(2 * n, min(req_size, cap))
        response = blob(2 * n + 1, min(resp_size, cap))

        def start(name: str = name, request: bytes = request, response: bytes = response) -> None:
            rpc_id = clients[name].call("S", split3(request), link.now)
            expected[(name, rpc_id)] = (request, response)

        link.later(at, start)

    def all_done() -> bool:
        return sum(len(h.responses) + len(h.failures) for h in heard.values()) == len(calls)

    link.run_until(all_done, max_time=30.0)
    for name, h in heard.items():
        assert h.failures == {}
        for rpc_id, got in h.responses.items():
            assert got == expected[(name, rpc_id)][1]
    assert len(expected) == len(calls)
    assert sorted(app.requests.values()) == [1] * len(calls)

    # afterwards everything is released: kept responses, partial messages, client records
    link.run_until(link.idle, max_time=link.now + 3 * config.response_keep + 1.0)
    assert server.kept_responses() == 0
    assert server.partial_requests() == 0
    assert server.known_clients() == 0
    assert all(core.outstanding_calls() == 0 for core in clients.values())
    assert sorted(app.requests.values()) == [1] * len(calls)


@pytest.mark.parametrize("max_datagram", [1472, 65000])
def test_16_mb_each_way_over_a_reordering_lossy_link(max_datagram: int) -> None:
    config = SessionConfig(max_datagram=max_datagram)
    link = Link(seed=7, loss=0.002, dup=0.002, jitter=0.002)
    client, heard, _, app = pair(link, config)
    message = blob(16, 16 * 1024 * 1024)
    rpc_id = client.call("S", [message], 0.0)
    link.run_until(lambda: bool(heard.responses or heard.failures), max_time=30.0)
    assert heard.responses[rpc_id] == message
    assert list(app.requests.values()) == [1]
    assert link.peak_inflight <= config.window_bytes + max_datagram - HEADER_SIZE


def test_scatter_lists_are_sent_as_slices_of_the_callers_buffers() -> None:
    config = SessionConfig(max_datagram=512, window_bytes=4096)
    client = SessionCore(config, client_id=1)
    big = bytes(range(256)) * 20
    words = array.array("I", range(50))
    message: list[Buffer] = [b"", bytearray(b"ab"), memoryview(words), big]
    client.call("S", message, 0.0)
    datagrams = list(client.outbox)
    assert len(datagrams) == 4096 // frag_of(config) + 1
    payload_parts = [part for _, parts in datagrams for part in parts[1:]]
    assert any(isinstance(p, memoryview) and p.obj is big for p in payload_parts)
    sent = b"".join(bytes(p) for p in payload_parts)
    assert sent == (b"ab" + words.tobytes() + big)[: len(sent)]


def test_single_datagram_payloads_are_views_of_the_received_datagram() -> None:
    config = SessionConfig()
    client, server = SessionCore(config, client_id=1), SessionCore(config, client_id=2)
    rpc_id = client.call("S", [b"ping"], 0.0)
    (_, request_parts) = client.outbox.popleft()
    request = b"".join(request_parts)
    server.receive(request, "C", 0.0)
    kind, token, payload = server.events.popleft()
    assert kind == EV_REQUEST and payload.obj is request and bytes(payload) == b"ping"
    server.reply(token, [b"pong"], 0.0)
    response = b"".join(server.outbox.popleft()[1])
    assert len(response) == HEADER_SIZE + 4 and HEADER_SIZE % 8 == 0
    client.receive(memoryview(bytearray(response)).cast("I"), "S", 0.0)  # any buffer works
    kind, got_id, payload = client.events.popleft()
    assert (kind, got_id, bytes(payload)) == (EV_RESPONSE, rpc_id, b"pong")


def test_send_now_takes_single_datagrams_in_order_and_refusals_fall_back_to_outbox() -> None:
    config = SessionConfig()
    client, server = SessionCore(config, client_id=1), SessionCore(config, client_id=2)
    sent: list[tuple[Any, bytes]] = []
    accept = [True]

    def send_now(peer: Any, datagram: bytes) -> bool:
        if accept[0]:
            sent.append((peer, datagram))
        return accept[0]

    client.send_now = server.send_now = send_now
    first = client.call("S", [b"one"], 0.0)
    assert not client.outbox and len(sent) == 1 and sent[0][0] == "S"
    server.receive(sent[0][1], "C", 0.0)
    _, token, _ = server.events.popleft()
    server.reply(token, [b"pong"], 0.0)
    assert not server.outbox and sent[1][0] == "C"
    client.receive(sent[1][1], "S", 0.0)
    assert client.events.popleft()[:2] == (EV_RESPONSE, first)
    accept[0] = False  # a full socket buffer: queued instead
    client.call("S", [b"two"], 0.0)
    assert len(client.outbox) == 1 and len(sent) == 2
    accept[0] = True  # while something is queued, later datagrams queue behind it
    client.call("S", [b"three"], 0.0)
    assert len(client.outbox) == 2 and len(sent) == 2
    payloads = [b"".join(parts)[HEADER_SIZE:] for _, parts in client.outbox]
    assert payloads == [b"two", b"three"]


# -- failure, liveness -------------------------------------------------------------------------


def test_dead_peer_fails_after_abort_after_and_not_before() -> None:
    config = SessionConfig(resend_interval=0.01, abort_after=0.25, response_keep=0.25)
    link = Link(loss=1.0)
    client, heard, _, _ = pair(link, config)
    rpc_id = client.call("S", [b"hello"], 0.0)
    link.run_until(lambda: bool(heard.failures), max_time=5.0)
    assert list(heard.failures) == [rpc_id] and heard.responses == {}
    failed_at = heard.times[rpc_id]
    assert config.abort_after - config.resend_interval <= failed_at
    assert failed_at <= config.abort_after + 2 * config.resend_interval
    assert client.stats.calls_failed == 1 and client.stats.pings_sent > 5
    assert client.outstanding_calls() == 0


def test_slow_handler_keeps_the_call_alive_with_busy() -> None:
    config = SessionConfig(resend_interval=0.01, abort_after=0.1, response_keep=0.1)
    link = Link(seed=3, loss=0.1)
    client, heard, server, app = pair(link, config, delay=0.5)
    rpc_id = client.call("S", [b"slow"], 0.0)
    link.run_until(lambda: bool(heard.responses or heard.failures), max_time=5.0)
    assert heard.responses == {rpc_id: b"slow"}
    assert server.stats.busy_sent > 10
    assert list(app.requests.values()) == [1]


def test_server_that_never_saw_the_request_asks_for_a_restart() -> None:
    config = SessionConfig()
    link = Link(drop=frozenset({0}))
    client, heard, server, app = pair(link, config)
    rpc_id = client.call("S", [b"lost once"], 0.0)
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    assert heard.responses == {rpc_id: b"lost once"}
    assert client.stats.pings_sent >= 1 and server.stats.resends_sent >= 1
    assert client.stats.retransmitted_bytes == len(b"lost once")
    assert list(app.requests.values()) == [1]


# -- duplicates and kept responses ---------------------------------------------------------------


def test_duplicate_requests_run_once_and_get_the_response_again() -> None:
    config = SessionConfig()
    link = Link()
    client, heard, server, app = pair(link, config)
    rpc_id = client.call("S", [b"once"], 0.0)
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    request = link.sent[0][2]
    for _ in range(3):
        link.inject("C", "S", request)
    assert list(app.requests.values()) == [1]
    assert server.stats.duplicates == 3
    assert server.stats.retransmitted_bytes == 0  # the response may still be in flight
    link.advance(link.now + config.resend_interval)
    link.inject("C", "S", request)
    assert server.stats.retransmitted_bytes == len(b"once")
    link.advance(link.now + 0.1)
    assert client.stats.dropped_unknown == 1  # the resent response, for a finished call
    assert heard.responses == {rpc_id: b"once"}


@pytest.mark.parametrize("size", [5, 5000])
def test_acknowledged_requests_are_not_run_again_when_a_copy_arrives_late(size: int) -> None:
    config = SessionConfig()
    link = Link()
    client, heard, server, app = pair(link, config)
    first = client.call("S", [bytes(size)], 0.0)
    link.run_until(lambda: first in heard.responses, max_time=1.0)
    old_request = [data for src, _, data in link.sent if src == "C" and data[1] != _GRANT]
    second = client.call("S", [b"second"], link.now)  # carries ack: everything below is done
    link.run_until(lambda: second in heard.responses, max_time=1.0)
    assert server.stats.responses_acked == 1 and server.kept_responses() == 1
    for data in old_request:
        link.inject("C", "S", data)
    assert sorted(app.requests.values()) == [1, 1]
    assert server.stats.duplicates == len(old_request)
    assert server.partial_requests() == 0


def test_acknowledged_records_are_reused_and_late_copies_still_refused() -> None:
    """The record of an acknowledged request becomes the next request's: a late copy of any
    earlier request is still stale, and a copy of the current one gets its own response."""
    config = SessionConfig()
    link = Link()
    client, heard, server, app = pair(link, config)
    requests: list[bytes] = []
    records: list[Any] = []  # (held: a freed record's address could be handed out again)
    for i in range(20):
        rpc_id = client.call("S", [b"call %d" % i], link.now)
        done = functools.partial(heard.responses.__contains__, rpc_id)
        link.run_until(done, max_time=link.now + 1.0)
        requests.append(next(d for src, _, d in reversed(link.sent) if src == "C"))
        (owner,) = server._clients.values()
        records.extend(owner.rpcs.values())
    assert server.stats.responses_acked == 19 and server.kept_responses() == 1
    assert len({id(rpc) for rpc in records}) <= 2  # the same two records, turn about
    link.advance(link.now + config.resend_interval)
    for old in requests[:-1]:
        link.inject("C", "S", old)
    assert server.stats.duplicates == 19 and server.stats.retransmitted_bytes == 0
    link.inject("C", "S", requests[-1])  # the current one: its kept response again
    assert server.stats.retransmitted_bytes == len(b"call 19")
    assert sorted(app.requests.values()) == [1] * 20
    assert heard.responses == {i + 1: b"call %d" % i for i in range(20)}


def test_kept_responses_expire_after_response_keep_and_not_before() -> None:
    config = SessionConfig(response_keep=2.0, abort_after=1.0)
    link = Link()
    client, heard, server, app = pair(link, config)
    other = SessionCore(config, client_id=0x2222)  # a second client: no ack frees the first
    other_heard = Client()
    link.attach("D", other, other_heard)
    client.call("S", [b"x" * 5000], 0.0)
    link.later(1.5, lambda: app_call(other, link))
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    (replied_at,) = app.reply_times.values()
    assert server.kept_responses() == 1
    link.advance(replied_at + config.response_keep - 0.01)
    assert server.kept_responses() == 2 and server.stats.responses_expired == 0
    link.run_until(lambda: server.kept_responses() == 1, max_time=10.0)
    assert link.now >= replied_at + config.response_keep
    assert server.stats.responses_expired == 1
    second_at = max(app.reply_times.values())
    assert second_at >= 1.5
    link.advance(second_at + config.response_keep - 0.01)
    assert server.kept_responses() == 1
    link.run_until(lambda: server.kept_responses() == 0, max_time=10.0)
    assert link.now >= second_at + config.response_keep
    assert server.stats.responses_expired == 2 and server.stats.responses_acked == 0
    link.run_until(link.idle, max_time=20.0)
    assert server.known_clients() == 0


def app_call(core: SessionCore, link: Link) -> None:
    core.call("S", [b"later"], link.now)


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_aborts_the_running_request_on_the_server() -> None:
    config = SessionConfig()
    link = Link()
    client, heard, server, app = pair(link, config, answer=None)
    rpc_id = client.call("S", [b"work"], 0.0)
    link.run_until(lambda: bool(app.requests), max_time=1.0)
    client.cancel(rpc_id, link.now)
    link.run_until(lambda: bool(app.aborted), max_time=1.0)
    assert app.aborted == list(app.requests)
    server.reply(app.aborted[0], [b"too late"], link.now)
    assert not server.outbox and server.stats.replies_dropped == 1
    link.inject("C", "S", link.sent[0][2])  # a delayed copy of the request: not run again
    assert list(app.requests.values()) == [1]
    link.run_until(link.idle, max_time=10.0)
    assert heard.responses == {} and heard.failures == {}
    assert client.outstanding_calls() == 0 and server.known_clients() == 0


def test_cancel_that_overtakes_its_request_keeps_the_request_from_running() -> None:
    config = SessionConfig()
    client, server = SessionCore(config, client_id=1), SessionCore(config, client_id=2)
    rpc_id = client.call("S", [b"never run"], 0.0)
    request = b"".join(client.outbox.popleft()[1])
    client.cancel(rpc_id, 0.0)
    abort = b"".join(client.outbox.popleft()[1])
    server.receive(abort, "C", 0.001)
    server.receive(request, "C", 0.002)
    assert not server.events and server.stats.duplicates == 1
    assert client.outstanding_calls() == 0 and not client.events


def test_cancel_drops_a_late_response_silently() -> None:
    config = SessionConfig()
    link = Link(delay=0.001)
    client, heard, server, app = pair(link, config)
    rpc_id = client.call("S", [b"racing"], 0.0)
    link.run_until(lambda: bool(app.reply_times), max_time=1.0)  # response now in flight
    client.cancel(rpc_id, link.now)
    link.run_until(link.idle, max_time=10.0)
    assert heard.responses == {} and heard.failures == {}
    assert client.stats.dropped_unknown == 1 and client.stats.calls_cancelled == 1
    assert app.aborted == [] and server.stats.requests_aborted == 1
    assert server.kept_responses() == 0


def test_cancel_frees_a_partially_received_request() -> None:
    config = SessionConfig(max_datagram=1472, window_bytes=16 * 1024)
    link = Link()
    client, heard, server, app = pair(link, config)
    rpc_id = client.call("S", [bytes(1_000_000)], 0.0)
    link.run_until(lambda: server.partial_requests() == 1, max_time=1.0)
    client.cancel(rpc_id, link.now)
    link.run_until(lambda: server.partial_requests() == 0, max_time=1.0)
    link.run_until(link.idle, max_time=10.0)
    assert app.requests == {} and heard.responses == {} and heard.failures == {}


# -- limits ------------------------------------------------------------------------------------


def test_call_over_max_message_raises_and_sends_nothing() -> None:
    client = SessionCore(SessionConfig(max_message=1000))
    with pytest.raises(ValueError, match="max_message"):
        client.call("S", [bytes(600), bytes(401)], 0.0)
    assert client.outstanding_calls() == 0 and not client.outbox


def test_server_refuses_a_request_over_its_max_message() -> None:
    link = Link()
    client, heard, server, app = pair(
        link, SessionConfig(), SessionConfig(max_message=10_000, max_reassembly_bytes=10_000)
    )
    rpc_id = client.call("S", [bytes(50_000)], 0.0)
    link.run_until(lambda: bool(heard.failures), max_time=1.0)
    assert "too large" in heard.failures[rpc_id]
    assert app.requests == {} and server.partial_requests() == 0
    assert server.stats.requests_refused >= 1


def test_forged_huge_length_is_refused_without_allocating() -> None:
    server = SessionCore(SessionConfig())
    server.receive(packet(_DATA, _FROM_CLIENT, 0xFFFFFFFF, 5, 1, 0, 1440, 0, bytes(1440)), "X", 0.0)
    assert server.partial_requests() == 0 and server.stats.requests_refused == 1
    ((peer, parts),) = server.outbox
    assert peer == "X" and parts[0][1] == _ABORT


def forged_first_fragment(seq: int) -> bytes:
    # ack = seq - 1: sequence 1 is still outstanding, so earlier partial requests stay wanted
    return packet(_DATA, _FROM_CLIENT, 100_000, 5, seq, 0, 1440, seq - 1, bytes(1440))


def test_partial_requests_are_capped_and_expire() -> None:
    config = SessionConfig(
        max_partial_messages=4, max_message=100_000, max_reassembly_bytes=100_000 * 100
    )
    server = SessionCore(config)
    for seq in range(1, 11):
        server.receive(forged_first_fragment(seq), "X", 0)
    assert server.partial_requests() == 4 and server.stats.dropped_capacity == 6
    deadline = server.next_deadline()
    for _ in range(1000):
        if deadline is None:
            break
        server.on_timer(deadline)
        server.outbox.clear()
        deadline = server.next_deadline()
    assert server.partial_requests() == 0 and server.stats.partials_expired == 4
    assert server.known_clients() == 0 and deadline is None


def test_reassembly_bytes_are_capped() -> None:
    config = SessionConfig(max_message=100_000, max_reassembly_bytes=250_000)
    server = SessionCore(config)
    for seq in range(1, 4):
        server.receive(forged_first_fragment(seq), "X", 0)
    assert server.partial_requests() == 2 and server.stats.dropped_capacity == 1


# -- flow control --------------------------------------------------------------------------------


def test_flow_control_bounds_bytes_in_flight_per_message() -> None:
    config = SessionConfig(window_bytes=32 * 1024)
    link = Link(seed=11, loss=0.05, jitter=0.003, dup=0.05)
    client, heard, server, app = pair(link, config)
    message = blob(4, 4 * 1024 * 1024)
    rpc_id = client.call("S", [message], 0.0)
    link.run_until(lambda: bool(heard.responses), max_time=30.0)  # Link asserts every send
    assert heard.responses[rpc_id] == message
    assert list(app.requests.values()) == [1]
    assert config.window_bytes // 2 < link.peak_inflight
    assert link.peak_inflight <= config.window_bytes + frag_of(config)
    assert server.stats.resends_sent > 0 and client.stats.resends_sent > 0


def test_config_rejects_unsafe_combinations() -> None:
    with pytest.raises(ValueError):
        SessionConfig(response_keep=0.5, abort_after=1.0)
    with pytest.raises(ValueError):
        SessionConfig(max_datagram=40)
    with pytest.raises(ValueError):
        SessionConfig(window_bytes=100)
    with pytest.raises(ValueError):
        SessionConfig(resend_interval=0.0)


# -- untrusted input ---------------------------------------------------------------------------


def busy_cores() -> tuple[Link, SessionCore, SessionCore]:
    """A client and server in the middle of a multi-fragment call and with a kept response.
    Forged grants can push a sender past its window, so the link does not check flow here."""
    config = SessionConfig(max_datagram=512, window_bytes=4096)
    link = Link(check_flow=False)
    client, heard, server, _ = pair(link, config)
    client.call("S", [b"small"], 0.0)
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    client.call("S", [bytes(20_000)], link.now)
    link.advance(link.now + 0.0007)
    return link, client, server


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes_are_dropped_and_never_raise(data: bytes) -> None:
    link, client, server = busy_cores()
    for core in (client, server, SessionCore(SessionConfig())):
        before = core.stats.dropped_malformed
        core.receive(data, "S", link.now)
        core.receive(memoryview(data), ("10.0.0.1", 9), link.now)
        if len(data) < HEADER_SIZE or data[0] != _MAGIC:
            assert core.stats.dropped_malformed == before + 2


@settings(max_examples=200, deadline=None)
@given(
    kind=st.integers(0, 8),
    flags=st.integers(0, 8),
    length=st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),
    cid=st.sampled_from([0x1111, 0x5555, 7]),
    seq=st.integers(0, 4),
    offset=st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1)),
    frag=st.sampled_from([0, 1, 64, 480, 1440, 65535]),
    ack=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=600),
    sender=st.sampled_from(["C", "S", "X"]),
)
def test_forged_headers_never_raise_and_leave_the_cores_working(
    kind: int,
    flags: int,
    length: int,
    cid: int,
    seq: int,
    offset: int,
    frag: int,
    ack: int,
    payload: bytes,
    sender: str,
) -> None:
    link, client, server = busy_cores()
    data = packet(kind, flags, length, cid, seq, offset, frag, ack, payload)
    for core in (client, server):
        core.receive(data, sender, link.now)
    link.handlers["S"] = Server(link, "S", echo)
    assert server.partial_requests() <= server.config.max_partial_messages
    fresh_exchange_works(link, server)


def fresh_exchange_works(link: Link, server: SessionCore) -> None:
    newcomer = SessionCore(server.config, client_id=0xABCDEF)
    heard = Client()
    link.attach("N", newcomer, heard)
    message = blob(1, 3000)
    rpc_id = newcomer.call("S", [message], link.now)
    link.run_until(lambda: bool(heard.responses or heard.failures), max_time=link.now + 5.0)
    assert heard.responses == {rpc_id: message}


@functools.cache
def recorded_datagrams() -> list[bytes]:
    """Every kind of packet, from a real exchange: data, grants, resends, busy, abort."""
    config = SessionConfig(
        max_datagram=512, window_bytes=2048, abort_after=0.05, response_keep=0.05
    )
    link = Link(seed=5, loss=0.2)
    client, heard, _, _ = pair(link, config, delay=0.03)
    for size in (10, 6000):
        client.call("S", [blob(size, size)], 0.0)
    gone = client.call("S", [b"cancel me"], 0.0)
    link.advance(0.001)
    client.cancel(gone, link.now)
    link.run_until(lambda: len(heard.responses) + len(heard.failures) == 2, max_time=5.0)
    return [data for _, _, data in link.sent]


@settings(max_examples=150, deadline=None)
@given(
    index=st.integers(0, 10_000),
    edits=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 600)),
    junk=st.binary(max_size=8),
)
def test_mutated_valid_packets_never_raise(
    index: int, edits: list[tuple[int, int]], cut: int | None, junk: bytes
) -> None:
    recorded = recorded_datagrams()
    original = recorded[index % len(recorded)]
    data = bytearray(original)
    for position, value in edits:
        if position < len(data):
            data[position] = value
    if cut is not None:
        del data[cut:]
    data += junk
    link, client, server = busy_cores()
    for core in (client, server):
        before = core.stats.dropped_malformed
        core.receive(bytes(data), "S" if core is client else "C", link.now)
        if len(data) != len(original) and not edits:
            assert core.stats.dropped_malformed == before + 1  # truncated or padded
    link.handlers["S"] = Server(link, "S", echo)
    fresh_exchange_works(link, server)


def test_recorded_exchange_covers_every_packet_kind() -> None:
    assert {data[1] for data in recorded_datagrams()} == set(range(_ALL_DATA, _ABORT + 1))


def test_sinks_get_requests_and_responses_instead_of_events() -> None:
    config = SessionConfig()
    client, server = SessionCore(config, client_id=1), SessionCore(config, client_id=2)
    got: list[tuple[str, Any, bytes]] = []

    def on_request(token: Any, payload: memoryview) -> None:
        got.append(("request", token, bytes(payload)))
        server.reply(token, [b"po", b"ng"], 0.0)  # the sink may call back into the core

    server.request_sink = on_request
    client.response_sink = lambda rpc_id, payload: got.append(("response", rpc_id, bytes(payload)))
    rpc_id = client.call("S", [b"pi", b"ng"], 0.0)
    ((_, request),) = client.outbox
    client.outbox.clear()
    assert server.receive(b"".join(request), "C", 0.0) is True
    ((_, response),) = server.outbox
    assert client.receive(b"".join(response), "S", 0.0) is True
    assert got == [("request", ("C", 1, rpc_id), b"ping"), ("response", rpc_id, b"pong")]
    assert not client.events and not server.events
    # a duplicate of the request is answered from the kept response, not delivered again
    assert server.receive(b"".join(request), "C", 1.0) is False and len(got) == 2


def test_deadline_moved_flags_every_newly_armed_timer() -> None:
    def moved(core: SessionCore) -> bool:  # read through a call: mypy narrows attributes
        return core.deadline_moved

    config = SessionConfig()
    client, server = SessionCore(config, client_id=1), SessionCore(config, client_id=2)
    assert not moved(client)
    client.call("S", [b"x"], 0.0)
    assert moved(client) and client.next_deadline() == config.resend_interval
    client.deadline_moved = False
    client.call("S", [b"y"], 0.001)  # the tick is already armed
    assert not moved(client)
    _, parts = client.outbox.popleft()
    server.receive(b"".join(parts), "C", 0.0)
    _, token, _ = server.events.popleft()
    server.reply(token, [b"z"], 0.0)  # a kept response arms the sweep
    assert moved(server) and server.next_deadline() == config.response_keep


# -- the inline call (the caller sends and polls itself) -----------------------------------------


def inline_call(link: Link, client: SessionCore, payload: bytes) -> int:
    """Start an inline call over the link as a driver does: send the datagram, then track it."""
    datagram = client.call_inline(payload)
    assert datagram is not None
    link._send("C", "S", datagram)
    return client.track_inline("S", payload, link.now)


@pytest.mark.parametrize("response_size", [0, 100, 50_000])
def test_inline_call_response_lands_in_inline_view_not_in_events(response_size: int) -> None:
    config = SessionConfig(max_datagram=1472)
    link = Link()
    client, heard, server, app = pair(link, config, answer=lambda t, p: [bytes(response_size)])
    rpc_id = inline_call(link, client, b"ping")
    assert client.outstanding_calls() == 1
    link.run_until(lambda: client.inline_view is not None, max_time=1.0)
    assert heard.responses == {} and not client.events  # multi-fragment responses too
    view = client.end_inline()
    assert view is not None and bytes(view) == bytes(response_size)
    assert client.outstanding_calls() == 0 and client.inline_view is None
    assert list(app.requests.values()) == [1]
    # the next call acknowledges the inline one: the server lets its response go
    client.call("S", [b"next"], link.now)
    link.run_until(lambda: len(heard.responses) == 1, max_time=1.0)
    assert list(heard.responses) == [rpc_id + 1]
    link.run_until(link.idle, max_time=10.0)
    assert server.kept_responses() == 0 and server.stats.responses_acked >= 1


def test_adopted_inline_call_is_retransmitted_and_delivered_as_an_ordinary_call() -> None:
    config = SessionConfig()
    link = Link(drop=frozenset({0}))  # the inline request is lost
    client, heard, _server, _app = pair(link, config)
    rpc_id = inline_call(link, client, b"lost once")
    assert client.adopt_inline() == rpc_id
    with pytest.raises(RuntimeError):
        client.adopt_inline()
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    assert heard.responses == {rpc_id: b"lost once"} and client.inline_view is None
    assert client.end_inline() is None and client.stats.calls_cancelled == 0


def test_ended_inline_call_without_response_is_cancelled_and_its_late_response_dropped() -> None:
    config = SessionConfig()
    link = Link(delay=0.001)
    client, heard, _server, app = pair(link, config, delay=0.01)
    inline_call(link, client, b"too slow")
    link.run_until(lambda: bool(app.requests), max_time=1.0)
    assert client.end_inline() is None
    assert client.outstanding_calls() == 0 and client.stats.calls_cancelled == 1
    link.run_until(link.idle, max_time=10.0)
    assert heard.responses == {} and client.inline_view is None
    assert app.aborted == list(app.requests)  # the server heard of it


def test_inline_call_that_dies_reports_inline_error() -> None:
    config = SessionConfig(abort_after=0.05)
    link = Link(loss=1.0)
    client, heard, _server, _app = pair(link, config)
    inline_call(link, client, b"nobody there")
    link.run_until(lambda: client.inline_error is not None, max_time=1.0)
    assert heard.failures == {} and not client.events
    with pytest.raises(RuntimeError):
        client.adopt_inline()
    assert client.end_inline() is None and client.outstanding_calls() == 0


def test_inline_call_answered_before_it_is_tracked_leaves_no_record() -> None:
    """The driver received the response right after sending (``SockOps.call_whole``)."""
    config = SessionConfig()
    link = Link()
    client, heard, server, app = pair(link, config)
    for i in range(3):
        datagram = client.call_inline(b"quick %d" % i)
        assert datagram is not None
        server.receive(datagram, "C", link.now)
        app(server.events.popleft())  # the server answers at once
        while server.outbox:
            _, parts = server.outbox.popleft()
            response = b"".join(parts)
            assert response[:8] == _FAST.pack(_RESPONSE_HEAD, len(response) - 32, 0, 0, 0)[:8]
            client.answered_inline(memoryview(response)[HEADER_SIZE:])
        assert client.outstanding_calls() == 0 and client.next_deadline() is None
        assert bytes(client.end_inline() or b"") == b"quick %d" % i
    # the next calls take the following sequence numbers and acknowledge the answered ones
    rpc_id = inline_call(link, client, b"tracked")
    assert rpc_id == 4
    link.run_until(lambda: client.inline_view is not None, max_time=1.0)
    assert bytes(client.end_inline() or b"") == b"tracked"
    client.call("S", [b"last"], link.now)
    link.run_until(lambda: bool(heard.responses), max_time=1.0)
    link.run_until(link.idle, max_time=10.0)
    assert list(app.requests.values()) == [1] * 5 and server.kept_responses() <= 1
    assert client.stats.datagrams_in >= 3 and client.stats.datagrams_out >= 5


def test_inline_call_is_refused_while_one_is_in_progress_or_output_is_queued() -> None:
    config = SessionConfig(max_datagram=1472)
    client = SessionCore(config, client_id=7)
    assert client.call_inline(bytes(2000)) is None  # over one datagram
    assert client.call_inline(b"a") is not None
    assert client.call_inline(b"b") is None  # (not tracked yet: still in progress)
    assert client.end_inline() is None  # never sent: nothing to tell the server
    assert not client.outbox and client.stats.calls_cancelled == 0
    client.call("S", [bytes(5000)], 0.0)  # a fragmented call leaves datagrams queued
    assert client.outbox and client.call_inline(b"c") is None


def test_calls_made_during_an_inline_call_acknowledge_only_what_is_done() -> None:
    config = SessionConfig()
    link = Link()
    client, heard, _server, app = pair(link, config, delay=0.005)
    first = inline_call(link, client, b"inline")
    second = client.call("S", [b"ordinary"], link.now)
    ack = _HEADER.unpack_from(b"".join(client.outbox[0][1]))[9]
    assert second - ack == first  # the inline call is still the lowest outstanding
    link.run_until(lambda: client.inline_view is not None and bool(heard.responses), max_time=1)
    assert bytes(client.end_inline() or b"") == b"inline"
    assert heard.responses == {second: b"ordinary"}
    assert list(app.requests.values()) == [1, 1]


def test_small_messages_of_bytearrays_are_copied_into_one_datagram() -> None:
    config = SessionConfig()
    client = SessionCore(config, client_id=1)
    sent: list[bytes] = []

    def send_now(peer: Any, datagram: bytes) -> bool:
        sent.append(datagram)
        return True

    client.send_now = send_now
    body = bytearray(b"body")
    parts: list[Buffer] = [b"head", body]
    client.call("S", parts, 0.0)
    body[:] = b"XXXX"  # the caller's buffer changes after the call: not what went out
    (datagram,) = sent
    assert datagram[HEADER_SIZE:] == b"headbody" and not client.outbox
    client.on_timer(config.resend_interval * 2)  # a ping, not a resend of the payload
    link_copy = [b"".join(buffers) for _, buffers in client.outbox]
    assert all(b"XXXX" not in d for d in link_copy)
