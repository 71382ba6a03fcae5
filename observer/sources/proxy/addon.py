"""The mitmproxy addons that record a device's traffic (loaded by ``addons/telemetry.py``).

Two addon objects sharing one ``RecordStore``: ``Recorder`` (options, connections, activity,
sessions; a host whose client rejected our certificate is passed through from then on; misspelled
``--set`` options are reported) and ``FlowRecorder`` (http, websocket and dns rows; no payload
kept in memory).
Every hook is wrapped: a failure is logged and counted, never raised into mitmproxy.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy.layers.tls import parse_client_hello

from observer import ObserverError
from observer.sources.proxy import counting
from observer.sources.proxy.flows import METADATA_KEY, conn_id_of, dns_rows, http_row, websocket_row
from observer.sources.proxy.records import ConnRecord, close_reason
from observer.sources.proxy.store import RecordStore
from observer.sources.proxy.traffic import Traffic, activity_rows

log = logging.getLogger("observer.proxy")


class Health:
    """Counts the addon's own failures; the first few are logged with a traceback."""

    def __init__(self) -> None:
        self.failures = 0
        self.uncounted_clients = 0

    def failed(self, where: str) -> None:
        self.failures += 1
        if self.failures <= 10 or self.failures % 1000 == 0:
            log.exception("observer: %s failed (failure %d); the proxy goes on", where,
                          self.failures)


HEALTH = Health()


def guarded[F: Callable[..., Any]](method: F) -> F:
    """Run a hook; log and count any exception instead of letting it reach mitmproxy."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except Exception:
            HEALTH.failed(method.__qualname__)
            return None

    return wrapper  # type: ignore[return-value]


def client_hello_sni(data: bytes) -> tuple[bool, str | None]:
    """(whether a client's first bytes hold a whole TLS ClientHello, its SNI)."""
    if not starts_like_tls_record(data):
        return False, None
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return True, None  # TLS, but a ClientHello we cannot read
    return (False, None) if hello is None else (True, hello.sni)


class Recorder:
    """Options, the record store, and one connections row (with activity bins) per client."""

    def __init__(self) -> None:
        self.store: RecordStore | None = None
        self.config: Any = None
        self.ticker: asyncio.Task | None = None
        self.saving = False
        self.keep_query = False
        self.stopped = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "observer_dir", str, "observer-records",
            "Records directory: JSONL under <dir>/live while running, Parquet tables in <dir> "
            "after a clean stop.",
        )
        loader.add_option(
            "observer_config", str, "",
            "Lab config YAML (device names by address, bin width, query redaction); empty: none.",
        )
        loader.add_option(
            "observer_bin_s", int, 0,
            "Width in seconds of the activity bins; 0 takes bin_seconds from the lab config "
            "(default 10).",
        )
        loader.add_option(
            "observer_keep_query", bool, False,
            "Keep URL query strings in http records (they are redacted to parameter names by "
            "default, as values often carry ids or tokens).",
        )
        loader.add_option(
            "observer_pinned_passthrough", bool, True,
            "When a client rejects the interception certificate (certificate pinning), add its "
            "host to ignore_hosts so its later connections pass through and are counted.",
        )
        loader.add_option(
            "observer_checkpoint_s", int, 60,
            "Seconds between partial rows of still-open connections in the JSONL files.",
        )
        loader.add_option(
            "observer_parquet", bool, True,
            "Convert this run's JSONL records to Parquet in observer_dir when mitmproxy stops.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "observer_config" in updated:
            self.config = None
            if opts.observer_config:
                from observer.config import load_config

                try:
                    self.config = load_config(opts.observer_config)
                except ObserverError as exc:
                    raise exceptions.OptionsError(f"observer_config: {exc}") from None
        if "observer_bin_s" in updated and opts.observer_bin_s < 0:
            raise exceptions.OptionsError(
                f"observer_bin_s must be 0 (from the lab config) or a number of seconds, "
                f"not {opts.observer_bin_s}."
            )
        if "observer_checkpoint_s" in updated and opts.observer_checkpoint_s <= 0:
            raise exceptions.OptionsError(
                f"observer_checkpoint_s must be a positive number of seconds, "
                f"not {opts.observer_checkpoint_s}."
            )
        self.keep_query = self._keep_query()
        if "observer_dir" in updated:
            try:
                Path(opts.observer_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise exceptions.OptionsError(
                    f"observer_dir: cannot create {opts.observer_dir}: {exc.strerror or exc}."
                ) from None

    @property
    def bin_s(self) -> float:
        if ctx.options.observer_bin_s:
            return float(ctx.options.observer_bin_s)
        return float(self.config.bin_seconds) if self.config else 10.0

    def _keep_query(self) -> bool:
        config_keeps = self.config is not None and not self.config.redact_query
        return bool(ctx.options.observer_keep_query or config_keeps)

    def device_of(self, ip: str | None) -> str:
        name = self.config.device_of(ip) if self.config and ip else None
        return name or ip or "unknown"

    @guarded
    def running(self) -> None:
        self.open_store()
        warn_unknown_options()

    def open_store(self) -> RecordStore | None:
        """Start recording, once: at ``running``, or at the first client if it comes earlier
        (mitmproxy accepts connections before its ``running`` hook has reached the scripts)."""
        if self.store is not None or self.stopped:
            return self.store
        devices = self.config.devices if self.config else ()
        self.saving = bool(ctx.options.save_stream_file)
        self.store = RecordStore(
            ctx.options.observer_dir,
            bin_s=self.bin_s,
            device_of=self.device_of,
            checkpoint_s=ctx.options.observer_checkpoint_s,
            session_device=devices[0].name if len(devices) == 1 else None,
        )
        self.store.start(time.time(), ",".join(ctx.options.mode))
        self.ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        log.info("observer: recording into %s (JSONL in %s)", self.store.directory,
                 self.store.live_dir)
        return self.store

    async def _tick_loop(self) -> None:
        period = min(self.bin_s, 5.0)
        while True:
            await asyncio.sleep(period)
            self.tick()

    @guarded
    def tick(self) -> None:
        if self.store is not None:
            self.store.tick(time.time())

    @guarded
    def done(self) -> None:
        self.stopped = True
        if self.ticker is not None:
            self.ticker.cancel()
        if self.store is None:
            return
        store, self.store = self.store, None
        note = f"addon failures: {HEALTH.failures}; clients not counted: {HEALTH.uncounted_clients}"
        written = store.stop(time.time(), parquet=ctx.options.observer_parquet, note=note)
        if written:
            summary = ", ".join(f"{n} {t}" for t, n in written.items() if n)
            log.info("observer: wrote Parquet records to %s: %s", store.directory, summary)

    def record_of(self, client: Any) -> ConnRecord | None:
        return self.store.open_conns.get(client.id) if self.store else None

    @guarded
    def client_connected(self, client: Any) -> None:
        if self.open_store() is None:
            return
        traffic = Traffic(self.store.bin_s, track_flow_bins=self.saving)
        peer = client.peername or (None, None)
        rec = ConnRecord(
            conn_id=conn_id_of(client),
            device=self.device_of(peer[0]),
            proto=client.transport_protocol,
            client_ip=peer[0],
            client_port=peer[1],
            proxy_mode=client.proxy_mode.type_name,
            ts_start=client.timestamp_start,
            traffic=traffic,
        )
        self.store.open_conns[client.id] = rec
        if not counting.attach(ctx.master, client, traffic):
            HEALTH.uncounted_clients += 1
            if HEALTH.uncounted_clients == 1:
                log.warning("observer: cannot count bytes of %s (mitmproxy internals changed?)",
                            peer)

    @guarded
    def next_layer(self, nextlayer: Any) -> None:
        rec = self.record_of(nextlayer.context.client)
        if rec is None or rec.client_hello_seen:
            return
        seen, sni = client_hello_sni(nextlayer.data_client())
        if seen:
            rec.client_hello_seen = True
            rec.name(sni, "sni")
            if rec.tls == "none":
                rec.tls = "passthrough"  # until an interception attempt says otherwise

    @guarded
    def server_connected(self, data: Any) -> None:
        rec = self.record_of(data.client)
        if rec is None or rec.ts_tcp_setup is not None:
            return
        server = data.server
        addr = server.peername or server.address
        if addr:
            rec.server_ip, rec.server_port = str(addr[0]), int(addr[1])
        rec.ts_tcp_setup = server.timestamp_tcp_setup

    @guarded
    def tls_clienthello(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is None:
            return
        rec.client_hello_seen = True
        rec.name(data.client_hello.sni, "sni")
        if not data.ignore_connection:
            rec.tls = "failed"  # an interception attempt: failed until the handshake completes
            rec.tls_error = "handshake did not complete"

    @guarded
    def tls_established_client(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is None:
            return
        conn = data.conn
        rec.tls, rec.tls_error = "intercepted", None
        rec.ts_tls_setup = conn.timestamp_tls_setup
        rec.name(conn.sni, "sni")
        if conn.alpn:
            rec.alpn = conn.alpn.decode("ascii", "replace")
        if conn.tls_version == "QUICv1":
            rec.proto = "quic"

    @guarded
    def tls_failed_client(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is not None:
            rec.tls, rec.tls_error = "failed", f"client: {data.conn.error}"
        if ctx.options.observer_pinned_passthrough:
            pass_through_later(data)

    @guarded
    def tls_failed_server(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is not None:
            rec.tls, rec.tls_error = "failed", f"server: {data.conn.error}"

    @guarded
    def client_disconnected(self, client: Any) -> None:
        rec = self.record_of(client)
        if rec is None or self.store is None:
            return
        rec.ts_end = client.timestamp_end
        rec.close_reason = close_reason(rec.traffic.closed_by, client.error)
        self.store.finish(client.id, rec)

    def snapshot(self, flow: Any) -> dict[str, Any] | None:
        """Put the connection's facts into a flow about to be saved (``mitmdump -w``)."""
        if not self.saving:
            return None
        rec = self.record_of(flow.client_conn)
        if rec is None:
            return None
        meta = flow.metadata.setdefault(METADATA_KEY, {})
        row = rec.row()
        if rec.traffic.closed_by and rec.close_reason is None:
            row["close_reason"] = rec.traffic.closed_by  # a TCP flow ends as its connection closes
        meta["conn"] = row
        meta.setdefault("activity", []).extend(
            activity_rows(rec.conn_id, rec.device, rec.traffic.bin_s, rec.traffic.take_flow_bins())
        )
        return meta


class BodyCounter:
    """A ``stream`` callable that counts a streamed body's bytes and passes them on unchanged."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, chunk: bytes) -> bytes:
        self.n += len(chunk)
        return chunk


class FlowRecorder:
    """Rows of the flows mitmproxy decodes (http, websocket, dns), and no payload kept after.

    TCP, UDP and WebSocket message contents are dropped once forwarded (bounded memory, no
    payload in memory or in a ``-w`` file).  The newest message is forwarded after its hook
    returns, so only older ones go at message time, the rest at the flow's end.
    """

    def __init__(self, recorder: Recorder) -> None:
        self.rec = recorder

    @guarded
    def requestheaders(self, flow: Any) -> None:
        if flow.request.stream is True:
            flow.request.stream = BodyCounter()

    @guarded
    def responseheaders(self, flow: Any) -> None:
        if flow.response.stream is True:
            flow.response.stream = BodyCounter()

    def _write(self, flow: Any) -> None:
        store = self.rec.store
        if store is None or flow.request is None:
            return
        conn = self.rec.record_of(flow.client_conn)
        device = conn.device if conn else self.rec.device_of(
            flow.client_conn.peername[0] if flow.client_conn.peername else None)
        req_stream = flow.request.stream
        resp_stream = flow.response.stream if flow.response else None
        row = http_row(
            flow, device, self.rec.keep_query,
            (req_stream.n if isinstance(req_stream, BodyCounter) else None,
             resp_stream.n if isinstance(resp_stream, BodyCounter) else None),
        )
        store.write("http", row)
        if conn is not None and conn.name_source == "none":
            conn.name(row["host"], "http")
        meta = self.rec.snapshot(flow)
        if meta is not None:
            meta["http"] = row

    @guarded
    def response(self, flow: Any) -> None:
        self._write(flow)

    @guarded
    def error(self, flow: Any) -> None:
        self._write(flow)

    @guarded
    def websocket_message(self, flow: Any) -> None:
        messages = flow.websocket.messages
        store = self.rec.store
        if store is not None:
            conn = self.rec.record_of(flow.client_conn)
            row = websocket_row(flow, messages[-1], conn.device if conn else "unknown")
            store.write("websocket", row)
            if self.rec.saving:
                flow.metadata.setdefault(METADATA_KEY, {}).setdefault("websocket", []).append(row)
        del messages[:-1]

    @guarded
    def websocket_end(self, flow: Any) -> None:
        flow.websocket.messages.clear()
        self.rec.snapshot(flow)

    @guarded
    def dns_response(self, flow: Any) -> None:
        store = self.rec.store
        if store is None:
            return
        peer = flow.client_conn.peername
        for row in dns_rows(flow, self.rec.device_of(peer[0] if peer else None)):
            store.write("dns", row)
        self.rec.snapshot(flow)

    @guarded
    def tcp_message(self, flow: Any) -> None:
        del flow.messages[:-1]

    udp_message = tcp_message

    @guarded
    def tcp_end(self, flow: Any) -> None:
        flow.messages.clear()
        self.rec.snapshot(flow)

    tcp_error = udp_end = udp_error = tcp_end


def pass_through_later(data: Any) -> str | None:
    """Add the host of a failed interception to ``ignore_hosts`` (as mitmproxy's contrib
    ``tls_passthrough.py`` does), so the pinned app keeps working and is counted; the host."""
    host = data.context.client.sni
    if not host and data.context.server.address:
        host = str(data.context.server.address[0])
    if not host:
        return None
    pattern = rf"^{re.escape(host)}:\d+$"
    if pattern not in ctx.options.ignore_hosts:
        ctx.options.update(ignore_hosts=[*ctx.options.ignore_hosts, pattern])
        log.info("observer: %s rejected the interception certificate (pinned?); "
                 "its later connections pass through", host)
    return host


def warn_unknown_options() -> None:
    """Warn about ``--set`` options nobody declared: mitmproxy keeps them silently."""
    known = list(ctx.options.keys())
    for name in sorted(ctx.options.deferred):
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        log.warning("observer: unknown option %r is ignored%s", name, hint)


def make_addons() -> list[Any]:
    """The addon instances ``addons/telemetry.py`` hands to mitmproxy.

    Two objects, not one per concern: mitmproxy walks every addon object for every hook of every
    flow, and each object costs about as much per request as the work it does (see
    docs/performance.md).
    """
    recorder = Recorder()
    return [recorder, FlowRecorder(recorder)]
