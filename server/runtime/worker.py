"""The gunicorn worker class: gunicorn's gevent worker with fixes for slow clients, restarts
and killed instances (``worker_class = "server.runtime.worker.GeventWorker"`` in gunicorn.conf.py).

- Client sockets get a read/write timeout (CLIENT_TIMEOUT_SECONDS). The stock gevent worker
  puts them in blocking mode with no timeout: a request head is bounded by KEEPALIVE (gunicorn
  wraps its parse in a gevent.Timeout), but a client that sends its headers and then stalls
  mid-body, or stops reading a response, held its connection slot for ever. WebSockets are
  exempt: an idle socket is their normal state.
- While draining (SIGTERM, see gunicorn.conf.py) every response closes its connection. An
  application's own ``Connection: close`` header is hop-by-hop and gunicorn drops it, so this
  has to be done here for keep-alive clients to move to another worker.
- SIGHUP hands each old worker's listeners over to a new worker (see ``offer_listeners``).
  gunicorn forks the new workers and at once sends SIGTERM to the old ones, seconds before
  the new ones have loaded the app, and with REUSE_PORT each worker has its own listener,
  opened right after the fork. So, stock: the new workers' listeners took a share of the new
  connections while they could not answer yet (measured: 10 s client timeouts), and the old
  workers' listeners, when closed, reset the connections queued on them. Here a new worker
  closes its early listener at once; when its app is loaded it takes the listener of an old
  worker (the same kernel socket, passed over a Unix socket) and serves it alongside the old
  worker, which then drains and exits. The socket outlives the old worker, so nothing queued
  on it is lost. Without a listener to take over (first start, a crashed worker's
  replacement) a worker opens its own.
- A response's status line and headers go out in the same write as its first body bytes
  (``CoalescingResponse``), so a worker killed mid-response never leaves a proxy holding a
  header it can neither complete nor retry.
- Fairness between keep-alive connections costs a switch only when one is owed (see
  ``handle_request``), and the settings read on every request are read once
  (``SettledConfig``).

``QuietLogger`` (``logger_class``) is gunicorn's logger minus the access line's formatting
when nothing would print it: with a ``logconfig_dict`` gunicorn formats every request's
access atoms and hands them to the ``gunicorn.access`` logger even when that logger is off.

Imported by the gunicorn master to find the class, so it imports nothing of the app.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gunicorn import glogging
from gunicorn.http import message as gmessage
from gunicorn.http import wsgi as gwsgi
from gunicorn.sock import create_sockets
from gunicorn.workers import ggevent
from gunicorn.workers.base_async import AsyncWorker
from gunicorn.workers.ggevent import GeventWorker as StockGeventWorker


def is_websocket(req: Any) -> bool:
    return any(name == "UPGRADE" and value.strip().lower() == "websocket"
               for name, value in req.headers)


class CoalescingResponse(gwsgi.Response):  # type: ignore[misc]
    """gunicorn's response, sending its status line and headers in the same write as the
    first body bytes (gunicorn sends them with two). A worker killed between the two writes
    left a proxy holding a 200 header with no body, which it can't retry on another instance
    (seen in tests/integration/test_scaleout.py: one request in 4 of 12 kill -9 runs). As one
    write, a small response is either all in the kernel's hands or not sent at all. Streams
    (chunked, or no Content-Length) send their headers at once, as before."""

    _head: bytes | None = None
    headers_sent: bool
    chunked: bool
    response_length: int | None

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        if self.chunked or self.response_length is None:
            super().send_headers()  # a stream: its client wants the headers at once
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._head = ("".join(lines) + "\r\n").encode("latin-1")
        self.headers_sent = True

    def flush_head(self) -> None:
        head, self._head = self._head, None
        if head:
            self.sock.sendall(head)

    def _emit_body(self, data: bytes) -> None:
        head, self._head = self._head, None
        if head is None:
            super()._emit_body(data)
            return
        self.sock.sendall(head + data)

    def process_headers(self, headers: Any) -> None:
        # gunicorn drops hop-by-hop headers an app sends. ``Connection: close`` from ours
        # means the answer was given without reading the body (413, a malformed body, a
        # full spool): close after it rather than drain a body of any declared length.
        if any(n.lower() == "connection" and v.strip().lower() == "close" for n, v in headers):
            self.must_close = True
        super().process_headers(headers)

    def sendfile(self, respiter: Any) -> Any:
        self.send_headers()
        self.flush_head()
        return super().sendfile(respiter)

    def close(self) -> None:
        # A response with no body bytes (HEAD, OPTIONS, 204, 304) never called write().
        self.send_headers()
        self.flush_head()
        super().close()


class SettledConfig:
    """A worker's gunicorn settings, each read once. ``Config.__getattr__`` looks a setting
    up and runs its getter on every access, and a request reads a dozen of them (1.6 % of a
    one-row predict's time under load). A worker's settings never change after the fork: a
    reload forks new workers with new ones."""

    def __init__(self, cfg: Any) -> None:
        self.__dict__["_cfg"] = cfg

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._cfg, name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a worker's settings are read-only")


def remembered_allow_list_check(check: Callable[..., bool]) -> Callable[..., bool]:
    """gunicorn's ``_ip_in_allow_list``, remembered per peer address: it parses the peer's
    address (``ipaddress.ip_address``) on every request to decide whether that peer may set
    forwarding headers. A worker sees a few peers (a balancer, a proxy) and its allow lists
    never change after the fork, so each address is decided once."""
    seen: dict[tuple[str, int, int], bool] = {}

    def allowed(ip: str, allow_list: Any, networks: Any) -> bool:
        key = (ip, id(allow_list), id(networks))
        found = seen.get(key)
        if found is None:
            if len(seen) >= 4096:  # many distinct clients straight on the worker: bounded
                seen.clear()
            found = seen[key] = check(ip, allow_list, networks)
        return found

    return allowed


class EagerStreamServer(ggevent.StreamServer):  # type: ignore[misc]
    """gevent's StreamServer, accepting up to 100 waiting connections per turn of the loop.
    gunicorn's gevent worker sets ``max_accept = 1`` when workers share one listener, so that
    one worker does not take every connection; with REUSE_PORT each worker has its own
    listener, and one accept per turn left connection storms waiting in the backlog: with
    1,000 connections opened at once, requests on the last ones accepted waited over 10 s
    (even on the bare app)."""

    max_accept = property(lambda self: 100, lambda self, value: None)


class GeventWorker(StockGeventWorker):  # type: ignore[misc]
    # Set by gunicorn.conf.py's post_worker_init: the client socket timeout, and the folder
    # (in RUNTIME_DIR) where retiring workers offer their listeners.
    client_timeout: float | None = None
    handoff_dir = ""
    draining = False  # set by the SIGTERM handler in gunicorn.conf.py
    listen_late = False
    sockets: list[Any]
    cfg: Any

    def init_process(self) -> None:
        self.cfg = SettledConfig(self.cfg)
        # The lists it is given are the settled config's own objects: the same every time.
        gmessage._ip_in_allow_list = remembered_allow_list_check(gmessage._ip_in_allow_list)
        gwsgi.Response = CoalescingResponse  # in this worker process only
        if self.cfg.reuse_port:
            ggevent.StreamServer = EagerStreamServer
        if self.cfg.reuse_port and self.sockets:
            for listener in self.sockets:
                listener.close()
            self.sockets = []
            self.listen_late = True
        super().init_process()

    def run(self) -> None:
        taken = self.take_over() if self.alive else []
        if self.listen_late:
            self.sockets = taken or [
                socket.socket(s.FAMILY, socket.SOCK_STREAM, fileno=s.sock.detach())
                for s in create_sockets(self.cfg, self.log)]
        else:
            for listener in taken:  # listeners shared through the master: we hold them
                listener.close()
        super().run()

    def offer_listeners(self, keep_waiting: Callable[[], bool]) -> bool:
        """Offer this worker's listeners to a worker that replaces it, and wait until one has
        taken them (True) or ``keep_waiting()`` turns False."""
        path = os.path.join(self.handoff_dir, f"offer-{self.pid}")
        try:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(path)
        except OSError as exc:
            self.log.warning("cannot offer listeners at %s: %s", path, exc)
            return False
        try:
            server.listen(1)
            server.settimeout(0.2)
            while keep_waiting():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(5)
                    socket.send_fds(conn, [b"L"], [s.fileno() for s in self.sockets])
                    if conn.recv(1) == b"k":
                        return True
            return False
        except OSError as exc:
            self.log.warning("listener hand-over failed: %s", exc)
            return False
        finally:
            server.close()
            try:
                os.unlink(path)  # still there when nobody took the offer
            except FileNotFoundError:
                pass

    def take_over(self) -> list[Any]:
        """The listeners offered by a worker this one replaces, or [] without an offer."""
        folder = self.handoff_dir
        names = sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else []
        for name in names:
            if not name.startswith("offer-") or ".taken" in name:
                continue
            claimed = os.path.join(folder, f"{name}.taken-{self.pid}")
            try:
                os.rename(os.path.join(folder, name), claimed)  # atomic: one taker per offer
            except OSError:
                continue
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                    conn.settimeout(5)
                    conn.connect(claimed)
                    _, fds, _, _ = socket.recv_fds(conn, 1, 16)
                    conn.sendall(b"k")
            except OSError as exc:
                self.log.warning("could not take over the listeners of %s: %s", name, exc)
                continue
            finally:
                os.unlink(claimed)
            self.log.info("took over the listeners of worker %s", name[len("offer-"):])
            return [socket.socket(fileno=fd) for fd in fds]
        return []

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        # The stock handle() only calls client.setblocking(1), i.e. no timeout at all.
        # (A stop waits for idle keep-alive connections to time out, as stock: closing them
        # at once raced with a client sending its next request on one, which then got no
        # answer; the SIGHUP test lost a request in 3-7 runs of 12.)
        client.settimeout(self.client_timeout or None)
        AsyncWorker.handle(self, listener, client, addr)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        # Fairness: a gevent socket switches only when a read would block. Under load the
        # next request of a keep-alive connection is often already buffered, so one greenlet
        # could serve its connection over and over while the others wait (measured: p50 1 ms,
        # p99 2-3 s at 64 connections). A greenlet that has not been through the event loop
        # since its previous request (the loop's iteration count has not moved) yields once
        # first; one that blocked on its socket since then already took its turn. Yielding
        # before every request cost 1.9 % of a one-row predict's time.
        current = gevent.getcurrent()
        loop = gevent.get_hub().loop
        if getattr(current, "served_in", None) == loop.iteration:
            gevent.sleep(0)
        current.served_in = loop.iteration
        if is_websocket(req):
            sock.settimeout(None)
        if self.draining:
            req.must_close = True  # gunicorn answers "Connection: close" and closes after
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError:
            # The client stopped reading our answer: close it quietly (gunicorn would log a
            # stack trace for a socket error without an errno).
            self.log.debug("client timed out: %s", addr)
            raise StopIteration() from None


class QuietLogger(glogging.Logger):
    """Skips gunicorn's per-request access formatting when ``gunicorn.access`` would drop it
    (our app writes its own JSON access line; see gunicorn.conf.py)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        # gunicorn decides before it applies logconfig_dict, which may turn the logger off.
        self._access_log_enabled = self._compute_access_log_enabled()

    def _compute_access_log_enabled(self) -> bool:
        return bool(super()._compute_access_log_enabled()
                    and self.access_log.isEnabledFor(logging.INFO))
