"""The mitmproxy addons that record a device's traffic (loaded by ``addons/telemetry.py``).

One addon object, ``Telemetry``: a ``Recorder`` (options, connections, activity, sessions; a host
whose client rejected our certificate is passed through from then on; misspelled ``--set``
options are reported) that also writes the http, websocket and dns rows (no payload kept in
memory).  One object, as mitmproxy offers every event to every addon object (docs/proxy.md).
Every hook is wrapped: a failure is logged and counted, never raised into mitmproxy.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import difflib
import functools
import gc
import ipaddress
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy.layers import TCPLayer, UDPLayer
from mitmproxy.proxy.layers.tls import parse_client_hello

from observer import ObserverError
from observer.devices import DeviceMap
from observer.sources.proxy import counting
from observer.sources.proxy.counting import BodyCounter
from observer.sources.proxy.flows import METADATA_KEY, conn_id_of, dns_rows, http_row, websocket_row
from observer.sources.proxy.records import ConnRecord, close_reason
from observer.sources.proxy.store import RecordStore, private_dir
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


def client_hello_of(data: bytes) -> tuple[bool, str | None, list[bytes]]:
    """(whether a client's first bytes hold a whole TLS ClientHello, its SNI, its ALPN offers)."""
    if not starts_like_tls_record(data):
        return False, None, []
    try:
        hello = parse_client_hello(data)
    except ValueError:
        return True, None, []  # TLS, but a ClientHello we cannot read
    return (False, None, []) if hello is None else (True, hello.sni, hello.alpn_protocols)


def alpn_text(protocols: list[bytes]) -> str | None:
    """ALPN protocols as the schema writes them: comma-separated, in the client's order."""
    return ",".join(p.decode("ascii", "replace") for p in protocols) or None


# TLS alert descriptions (RFC 8446 section 6) a client sends when it rejects a server.
ALERTS = {0: "close_notify", 40: "handshake_failure", 42: "bad_certificate",
          43: "unsupported_certificate", 44: "certificate_revoked", 45: "certificate_expired",
          46: "certificate_unknown", 48: "unknown_ca", 49: "access_denied", 80: "internal_error",
          90: "user_canceled"}
SSL_CB_READ_ALERT = 0x4004
# Client bytes after its handshake that still mean "no request": at most one TLS alert record
# (close_notify: 24 bytes in TLS 1.3, 31 in TLS 1.2 with AES-GCM).
ONE_ALERT_RECORD = 31


def pinned_after_handshake(rec: ConnRecord, window_s: float) -> str | None:
    """Why an intercepted connection counts as a certificate rejection after its handshake, or
    None.  Pinning libraries check the certificate once the handshake completes and then close
    at once, or send an alert, without a request; an idle (pre-opened) connection sends nothing
    either, but is closed later, when the client gives up on it."""
    if rec.tls != "intercepted" or rec.spoke or rec.up_at_handshake is None:
        return None
    if rec.counter is None:  # its bytes were not counted: no way to tell
        return None
    if rec.alert is not None:
        return f"client alert after handshake: {rec.alert}"
    quiet = rec.traffic.bytes_up - rec.up_at_handshake <= ONE_ALERT_RECORD
    quick = (rec.ts_end or 0.0) - (rec.ts_tls_setup or 0.0) <= window_s
    if quiet and quick and rec.traffic.closed_by == "client":
        return "pinned after handshake"
    return None


class Recorder:
    """Options, the record store, and one connections row (with activity bins) per client."""

    def __init__(self) -> None:
        self.store: RecordStore | None = None
        self.config: Any = None
        self.ticker: asyncio.Task | None = None
        self.saving = False
        self.keep_query = False
        self.console = False
        self.devices = DeviceMap.from_config(None)
        self.stopped = False
        self.decide: Callable[[Any], None] | None = None  # mitmproxy's own next_layer choice

    def load(self, loader: Any) -> None:
        logging.getLogger("asyncio").addFilter(not_cancelled)
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
            "observer_pin_window_s", float, 1.0,
            "A client that closes an intercepted connection within this many seconds of its "
            "handshake, before any request, rejected the certificate after the handshake.",
        )
        loader.add_option(
            "observer_run", str, "",
            "Name of this run's JSONL files (proxy-<run>-*.jsonl); empty: a random one.",
        )
        loader.add_option(
            "observer_console", bool, False,
            "Print one line per HTTP exchange with its URL redacted as in the records (use with "
            "flow_detail=0, as mitmproxy's own lines show whole URLs).",
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
            self.devices = DeviceMap.from_config(self.config)
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
        self.console = opts.observer_console
        if "observer_dir" in updated:
            try:
                private_dir(Path(opts.observer_dir))
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
        """The device of a client address: configured name, else the address (one device map
        for every source, observer.devices)."""
        return self.devices.name(ip)

    @guarded
    def running(self) -> None:
        self.open_store()
        # The addon's imports (pandas, pyarrow) add half again to the objects mitmdump starts
        # with, and every full garbage collection walks them all: keep what exists at start-up
        # out of the collector's way (it lives as long as the process anyway).
        gc.freeze()
        warn_unknown_options()

    def open_store(self) -> RecordStore | None:
        """Start recording, once: at ``running``, or at the first client if it comes earlier
        (mitmproxy accepts connections before its ``running`` hook has reached the scripts)."""
        if self.store is not None or self.stopped:
            return self.store
        devices = self.config.devices if self.config else ()
        self.saving = bool(ctx.options.save_stream_file)
        os.umask(0o077)  # records, flow files and keys of this process: owner only
        chooser = ctx.master.addons.get("nextlayer")
        self.decide = chooser.next_layer if chooser is not None else None
        self.store = RecordStore(
            ctx.options.observer_dir,
            bin_s=self.bin_s,
            device_of=self.device_of,
            checkpoint_s=ctx.options.observer_checkpoint_s,
            session_device=devices[0].name if len(devices) == 1 else None,
            run=ctx.options.observer_run,
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
        if type(ctx.master).__name__ == "DumpMaster":  # mitmdump, not a test's master
            atexit.register(exit_cleanly)
        if self.ticker is not None:
            self.ticker.cancel()
        if self.store is None:
            return
        store, self.store = self.store, None
        note = f"addon failures: {HEALTH.failures}; clients not counted: {HEALTH.uncounted_clients}"
        try:
            written = store.stop(time.time(), parquet=ctx.options.observer_parquet, note=note)
        except ObserverError as exc:
            log.error("observer: %s", exc)
            return
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
        rec.counter = counting.attach(ctx.master, client, traffic)
        if rec.counter is None:
            HEALTH.uncounted_clients += 1
            if HEALTH.uncounted_clients == 1:
                log.warning("observer: cannot count bytes of %s (mitmproxy internals changed?)",
                            peer)

    @guarded
    def next_layer(self, nextlayer: Any) -> None:
        """Name a passed-through TLS connection from its ClientHello.

        Scripts see this hook before mitmproxy's own next_layer addon, so let it choose the layer
        first (it keeps a layer already chosen): an intercepted ClientHello is then parsed by
        mitmproxy only (tls_clienthello), and only one it relays unread is parsed here, once.
        """
        rec = self.record_of(nextlayer.context.client)
        if rec is None or rec.client_hello_seen:
            return
        if nextlayer.layer is None and self.decide is not None:
            self.decide(nextlayer)
        if not isinstance(nextlayer.layer, TCPLayer | UDPLayer):
            return
        seen, sni, alpn = client_hello_of(nextlayer.data_client())
        if seen:
            rec.client_hello_seen = True
            rec.name(sni, "sni")
            rec.alpn = alpn_text(alpn)
            if rec.tls == "none":
                rec.tls = "passthrough"

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
    def server_connect_error(self, data: Any) -> None:
        """Keep what the client asked for (a CONNECT's host and port) when it cannot be
        reached."""
        rec = self.record_of(data.client)
        if rec is None or rec.ts_tcp_setup is not None or not data.server.address:
            return
        host, port = data.server.address
        rec.server_port = int(port)
        if is_ip(str(host)):
            rec.server_ip = str(host)
        else:
            rec.name(str(host), "http")
        rec.connect_error = f"connect: {data.server.error}"
        if rec.tls in ("none", "passthrough"):
            rec.tls_error = rec.connect_error
        else:
            rec.settle_tls()

    @guarded
    def tls_clienthello(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is None:
            return
        hello = data.client_hello
        rec.client_hello_seen = True
        rec.name(hello.sni, "sni")
        rec.alpn = alpn_text(hello.alpn_protocols)
        if data.ignore_connection:
            rec.tls = "passthrough"
        else:
            rec.tls = "failed"  # an interception attempt: failed until the handshake completes
            rec.tls_error = "handshake did not complete"

    @guarded
    def tls_established_client(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is None:
            return
        conn = data.conn
        rec.client_tls_error = None
        rec.ts_tls_setup = conn.timestamp_tls_setup
        rec.up_at_handshake = rec.traffic.bytes_up
        rec.name(conn.sni, "sni")
        if conn.alpn:
            rec.alpn = conn.alpn.decode("ascii", "replace")
        if conn.tls_version == "QUICv1":
            rec.proto = "quic"
        elif data.ssl_conn is not None and ctx.options.observer_pinned_passthrough:
            data.ssl_conn.set_info_callback(functools.partial(note_alert, rec))
        rec.settle_tls()

    @guarded
    def tls_failed_client(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is not None:
            rec.client_tls_error = f"client: {data.conn.error}"
            rec.settle_tls()
        if ctx.options.observer_pinned_passthrough:
            pass_through_later(host_of(data.context))

    @guarded
    def tls_failed_server(self, data: Any) -> None:
        rec = self.record_of(data.context.client)
        if rec is not None:
            rec.server_tls_error = f"server: {data.conn.error}"
            rec.settle_tls()

    @guarded
    def client_disconnected(self, client: Any) -> None:
        rec = self.record_of(client)
        if rec is None or self.store is None:
            return
        if rec.counter is not None:
            rec.counter.settle_delivery()  # if the client's close did not reach the layer
        rec.ts_end = client.timestamp_end
        rec.close_reason = close_reason(rec.traffic.closed_by, client.error)
        reason = pinned_after_handshake(rec, ctx.options.observer_pin_window_s)
        if reason:
            rec.tls, rec.tls_error = "failed", reason
            if ctx.options.observer_pinned_passthrough:
                pass_through_later(rec.server_name or rec.server_ip)
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


class Telemetry(Recorder):
    """The addon: the Recorder's rows plus those of the flows mitmproxy decodes (http, websocket,
    dns), and no payload kept after.

    An HTTP exchange costs one hook, ``response`` (or ``error``): the counting layer notes the
    request and counts streamed bodies as their headers pass, and each hook an addon defines is
    one more dispatch per event.  TCP, UDP and WebSocket message contents are dropped once
    forwarded (bounded memory, no payload in memory or in a ``-w`` file).  The newest message is
    forwarded after its hook returns, so only older ones go at message time, the rest at the
    flow's end.
    """

    def _write(self, flow: Any) -> None:
        store = self.store
        if store is None or flow.request is None:
            return
        conn = self.record_of(flow.client_conn)
        device = conn.device if conn else self.device_of(
            flow.client_conn.peername[0] if flow.client_conn.peername else None)
        req_stream = flow.request.stream
        resp_stream = flow.response.stream if flow.response else None
        row = http_row(
            flow, device, self.keep_query,
            (req_stream.n if isinstance(req_stream, BodyCounter) else None,
             resp_stream.n if isinstance(resp_stream, BodyCounter) else None),
        )
        if flow.error and conn is not None and row["response_body_bytes"]:
            # An aborted download: what the client never acknowledged was not delivered.
            row["response_body_bytes"] = max(
                0, row["response_body_bytes"] - conn.traffic.undelivered)
        store.write("http", row)
        if self.console:
            log.info("%s %s %s://%s%s -> %s", row["device"], row["method"], row["scheme"],
                     row["host"], row["path"], row["status"] or flow.error)
        if conn is not None and conn.name_source == "none":
            conn.name(row["host"], "http")
        meta = self.snapshot(flow)
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
        store = self.store
        if store is not None:
            conn = self.record_of(flow.client_conn)
            row = websocket_row(flow, messages[-1], conn.device if conn else "unknown")
            store.write("websocket", row)
            if self.saving:
                flow.metadata.setdefault(METADATA_KEY, {}).setdefault("websocket", []).append(row)
        del messages[:-1]

    @guarded
    def websocket_end(self, flow: Any) -> None:
        flow.websocket.messages.clear()
        self.snapshot(flow)

    @guarded
    def dns_response(self, flow: Any) -> None:
        store = self.store
        if store is None:
            return
        peer = flow.client_conn.peername
        for row in dns_rows(flow, self.device_of(peer[0] if peer else None)):
            store.write("dns", row)
        self.snapshot(flow)

    @guarded
    def tcp_message(self, flow: Any) -> None:
        if flow.messages[-1].from_client:
            conn = self.record_of(flow.client_conn)
            if conn is not None:
                conn.used = True
        del flow.messages[:-1]

    udp_message = tcp_message

    @guarded
    def tcp_end(self, flow: Any) -> None:
        flow.messages.clear()
        self.snapshot(flow)

    tcp_error = udp_end = udp_error = tcp_end


def note_alert(rec: ConnRecord, _conn: Any, where: int, ret: int) -> None:
    """OpenSSL info callback of an intercepted client connection: keep the first alert the
    client sent after the handshake (mitmproxy only logs it)."""
    if where & SSL_CB_READ_ALERT == SSL_CB_READ_ALERT and rec.alert is None and not rec.spoke:
        code = ret & 0xFF
        if code:  # close_notify is a normal close, told apart by timing instead
            rec.alert = ALERTS.get(code, f"alert {code}")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_of(context: Any) -> str | None:
    """The host a connection was for: its SNI, else the server address."""
    if context.client.sni:
        return context.client.sni
    return str(context.server.address[0]) if context.server.address else None


def pass_through_later(host: str | None) -> str | None:
    """Add the host of a failed interception to ``ignore_hosts`` (as mitmproxy's contrib
    ``tls_passthrough.py`` does), so the pinned app keeps working and is counted; the host."""
    if not host:
        return None
    pattern = rf"^{re.escape(host)}:\d+$"
    if pattern not in ctx.options.ignore_hosts:
        ctx.options.update(ignore_hosts=[*ctx.options.ignore_hosts, pattern])
        log.info("observer: %s rejected the interception certificate (pinned?); "
                 "its later connections pass through", host)
    return host


def exit_cleanly() -> None:
    """At interpreter exit after a clean stop (every addon's ``done`` has run, the records are
    written): end the process now with status 0.  mitmproxy_rs's threads (WireGuard, UDP) can
    crash the interpreter's own teardown after that (SIGSEGV, or "terminate called without an
    active exception"), which would turn a clean stop into a random exit status."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def not_cancelled(record: logging.LogRecord) -> bool:
    """Logging filter for asyncio: connection tasks cancelled as mitmdump exits are expected,
    not errors (Python 3.12.1's asyncio reports each with a traceback on stderr; their records
    were already written in ``done``)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, asyncio.CancelledError)


def warn_unknown_options() -> None:
    """Warn about ``--set`` options nobody declared: mitmproxy keeps them silently."""
    known = list(ctx.options.keys())
    for name in sorted(ctx.options.deferred):
        guess = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        log.warning("observer: unknown option %r is ignored%s", name, hint)


def make_addons() -> list[Any]:
    """The addon instances ``addons/telemetry.py`` hands to mitmproxy: one object, as mitmproxy
    offers every event to every addon object (docs/proxy.md, "What the addon costs")."""
    return [Telemetry()]
