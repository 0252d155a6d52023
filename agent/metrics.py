"""Prometheus metrics: ``netagent run --metrics ADDR:PORT`` (or ``metrics`` in the config).

Off by default, and this module (with ``prometheus_client``) is imported only when it is
on. Two halves (the names are in ``docs/metrics.md``):

* what happens, counted as it happens through the rooms' :class:`~netagent.agent.probe.Probe`
  calls and the event bus: requests by op and result and their duration, reconcile pass
  durations, event lag, event-loop lag, repairs by kind, attaches, connections cleared,
  events by type;
* what is, read at each scrape the way a client reads it, through the API's own
  ``status`` and ``show`` (in the daemon, no socket): intents by kind and state, forwards,
  failing keys, orphans, the firewall, clients, and the counters ``show`` reports per part
  (``packets``, ``bytes``): those families appear once ``show`` has them, never as zeros.

The endpoint is served on the daemon's event loop (a scrape never touches state from
another thread); the snapshot is taken on the loop, the text written in a worker thread.
One scrape at a time, a time limit on each connection, a few connections at most.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.metrics_core import Metric

from . import ops
from .config import metrics_address
from .errors import BackendUnavailable
from .probe import Probe

if TYPE_CHECKING:
    from .api import Service
    from .kinds import Registry

log = structlog.get_logger("netagent.metrics")

#: seconds: a request, a reconcile pass
DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)  # fmt: skip
#: seconds: how long an event waited, how late the loop ran
LAG_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
#: connections served at once; a scrape's time limit (seconds)
MAX_CONNECTIONS = 8
SCRAPE_TIMEOUT = 10.0
#: bytes of a request's head
MAX_HEAD = 8192


class MetricsProbe(Probe):
    """Counts what the rooms report, as it happens."""

    def __init__(self, registry: CollectorRegistry, kinds: Registry) -> None:
        self.kinds = kinds
        self.requests = Counter(
            "netagent_requests",
            "Requests answered, by op and result (ok, or the error's name).",
            ["op", "result"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "netagent_request_duration_seconds",
            "Seconds from a request read to its answer, by op.",
            ["op"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.passes = Histogram(
            "netagent_reconcile_pass_duration_seconds",
            "Seconds one reconcile pass took, by what triggered it.",
            ["trigger"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.event_lag_seconds = Histogram(
            "netagent_event_lag_seconds",
            "Seconds from reading a kernel event to the end of the pass that acted on it "
            "(the oldest event of each such pass).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag_seconds = Histogram(
            "netagent_event_loop_lag_seconds",
            "How late the event loop ran a task that asked to wake (sampled every 10 ms).",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.repairs = Counter(
            "netagent_repairs",
            "Repairs: a part found not as desired (an event, drift, the periodic pass) and "
            "put back, by kind.",
            ["kind"],
            registry=registry,
        )
        self.attaches = Counter(
            "netagent_attaches",
            "Interfaces an attach rule took (attached), could not take (failed) or left "
            "alone (left_alone).",
            ["result"],
            registry=registry,
        )
        self.cleared = Counter(
            "netagent_connections_cleared",
            "Tracked connections cleared when a forward was removed or retargeted.",
            registry=registry,
        )
        self.events = Counter(
            "netagent_events",
            "Events published (what `netagent ctl events` shows), by type.",
            ["type"],
            registry=registry,
        )

    @staticmethod
    def _op(op: str) -> str:
        """The op's own name (an alias counts as its op); anything else is ``unknown``,
        so a client cannot make label values up."""
        cls = ops.BY_OP.get(op)
        return cls.op if cls is not None else "unknown"

    def request(self, op: str, result: str, seconds: float) -> None:
        name = self._op(op)
        self.requests.labels(name, result).inc()
        self.request_seconds.labels(name).observe(seconds)

    def reconcile_pass(self, trigger: str, seconds: float) -> None:
        self.passes.labels(trigger).observe(seconds)

    def event_lag(self, seconds: float) -> None:
        self.event_lag_seconds.observe(seconds)

    def loop_lag(self, seconds: float) -> None:
        self.loop_lag_seconds.observe(seconds)

    def event(self, event: dict[str, Any]) -> None:
        kind = str(event.get("type", "?"))
        self.events.labels(kind).inc()
        if kind == "repaired":
            key = str(event.get("key", ""))
            of = self.kinds.of_key(key)
            self.repairs.labels(of.name if of is not None else key.partition("/")[0]).inc()
        elif kind == "attached":
            self.attaches.labels("attached").inc()
        elif kind == "attach-failed":
            self.attaches.labels("failed").inc()
        elif kind == "left-alone":
            self.attaches.labels("left_alone").inc()
        elif kind == "connections-cleared":
            cleared = event.get("cleared")
            if isinstance(cleared, int) and cleared > 0:
                self.cleared.inc(cleared)


class Snapshot:
    """The families of what is, taken from ``status`` and ``show`` at a scrape."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families

    def take(self, status: dict[str, Any], show: dict[str, Any]) -> None:
        fams: list[Metric] = []
        info = InfoMetricFamily("netagent", "The daemon: version and firewall backend.")
        info.add_metric(
            [], {"version": str(status.get("version")), "firewall": str(status.get("firewall"))}
        )
        fams.append(info)
        fams.append(_gauge("netagent_uptime_seconds", "Seconds since start.", status["uptime_s"]))
        intents = GaugeMetricFamily(
            "netagent_intents",
            "Desired parts, by kind and state (in place, pending, drifted, failing, ...).",
            labels=["kind", "state"],
        )
        forwards = GaugeMetricFamily(
            "netagent_forwards", "Desired port forwards, by state.", labels=["state"]
        )
        by: dict[tuple[str, str], int] = {}
        fwd: dict[str, int] = {}
        packets = CounterMetricFamily(
            "netagent_packets",
            "Packets counted per part, as `netagent ctl show` reports them.",
            labels=["kind", "key"],
        )
        octets = CounterMetricFamily(
            "netagent_bytes",
            "Bytes counted per part, as `netagent ctl show` reports them.",
            labels=["kind", "key"],
        )
        counted = False
        for item in show.get("intents") or []:
            kind, state = str(item.get("kind")), str(item.get("state"))
            by[kind, state] = by.get((kind, state), 0) + 1
            if kind == "forward":
                fwd[state] = fwd.get(state, 0) + 1
            p, b = item.get("packets"), item.get("bytes")
            if _number(p) and _number(b):
                counted = True
                packets.add_metric([kind, str(item.get("key"))], p)
                octets.add_metric([kind, str(item.get("key"))], b)
        for (kind, state), n in sorted(by.items()):
            intents.add_metric([kind, state], n)
        for state, n in sorted(fwd.items()):
            forwards.add_metric([state], n)
        fams += [intents, forwards]
        if counted:  # absent, not zero, until show reports counters
            fams += [packets, octets]
        fams.append(
            _gauge(
                "netagent_failing",
                "Parts failing (retried with backoff).",
                len(status.get("failing") or {}),
            )
        )
        fams.append(
            _gauge(
                "netagent_orphans",
                "Things marked as netagent's that nothing desired (`ctl purge --orphans`).",
                len(show.get("orphans") or []),
            )
        )
        fw = show.get("firewall") or {}
        up = GaugeMetricFamily(
            "netagent_firewall_in_place",
            "1 while the firewall's rules are as desired.",
            labels=["backend"],
        )
        up.add_metric([str(fw.get("backend"))], 1 if fw.get("in_place") else 0)
        fams.append(up)
        fams.append(_gauge("netagent_clients", "Connected clients.", status.get("clients", 0)))
        for name, doc, key in (
            ("netagent_refused_connections", "Connections refused (access).", "refused"),
            ("netagent_client_timeouts", "Clients dropped for being too slow.", "timeouts"),
            (
                "netagent_event_resyncs",
                "Full resyncs after kernel events were lost (ENOBUFS).",
                "event_resyncs",
            ),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], status.get(key, 0))
            fams.append(c)
        lag = status.get("loop_lag_ms") or {}
        fams.append(
            _gauge(
                "netagent_event_loop_lag_max_seconds",
                "The event loop's largest lag in the last 5 s.",
                float(lag.get("max", 0.0)) / 1000,
            )
        )
        self.families = fams


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def bind(text: str) -> socket.socket:
    """The listening TCP socket, bound at start (a port in use stops the start)."""
    host, port = metrics_address(text)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=16)
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot serve metrics on {text}: {exc.strerror or exc}; pick another "
            "--metrics ADDR:PORT"
        ) from None
    sock.setblocking(False)
    return sock


class Exporter:
    def __init__(self, address: str, kinds: Registry) -> None:
        self.address = address
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self.probe = MetricsProbe(self.registry, kinds)
        self.snapshot = Snapshot()
        self.registry.register(self.snapshot)
        self.sock = bind(address)
        self._lock = anyio.Lock()
        self._connections = 0

    def close(self) -> None:
        self.sock.close()

    async def serve(self, api: Service) -> None:
        listener = await anyio.abc.SocketListener.from_socket(self.sock)
        log.info("serving metrics", address=self.address, path="/metrics")
        async with anyio.create_task_group() as tg:
            while True:
                try:
                    stream = await listener.accept()
                except anyio.BrokenResourceError:  # out of fds: later
                    await anyio.sleep(0.5)
                    continue
                if self._connections >= MAX_CONNECTIONS:
                    await stream.aclose()
                    continue
                tg.start_soon(self._connection, stream, api)

    async def _connection(self, stream: anyio.abc.SocketStream, api: Service) -> None:
        self._connections += 1
        try:
            with anyio.fail_after(SCRAPE_TIMEOUT):
                head = await BufferedByteReceiveStream(stream).receive_until(b"\r\n\r\n", MAX_HEAD)
                status, ctype, body = await self._answer(head, api)
                await stream.send(_response(status, ctype, body, head.startswith(b"HEAD ")))
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
            pass  # not HTTP, or it went away
        except (TimeoutError, anyio.BrokenResourceError, OSError):
            pass
        except Exception:
            log.exception("serving metrics failed")
        finally:
            self._connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _answer(self, head: bytes, api: Service) -> tuple[str, str, bytes]:
        words = head.split(b"\r\n", 1)[0].split(b" ")
        if len(words) != 3 or not words[2].startswith(b"HTTP/"):
            return "400 Bad Request", "text/plain", b"not an HTTP request\n"
        method, path = words[0], words[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
        if path == b"/":
            return "200 OK", "text/plain", b"netagent: metrics at /metrics\n"
        if path != b"/metrics":
            return "404 Not Found", "text/plain", b"netagent serves /metrics only\n"
        return "200 OK", CONTENT_TYPE_LATEST, await self.scrape(api)

    async def scrape(self, api: Service) -> bytes:
        """The exposition text: the snapshot taken on the loop, written in a thread."""
        from .api import Peer

        async with self._lock:
            me = Peer(os.getpid(), 0, 0, "ro")
            t0 = time.perf_counter()
            status = await api.handle("status", {}, me)
            show = await api.handle("show", {}, me)
            self.snapshot.take(status, show)
            body: bytes = await anyio.to_thread.run_sync(generate_latest, self.registry)
            log.debug("metrics scraped", ms=round((time.perf_counter() - t0) * 1000, 2))
            return body


def _response(status: str, ctype: str, body: bytes, head_only: bool) -> bytes:
    lines: Iterable[str] = (
        f"HTTP/1.1 {status}",
        f"Content-Type: {ctype}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    )
    return "\r\n".join(lines).encode() + (b"" if head_only else body)
