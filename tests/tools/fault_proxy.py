"""A TCP proxy that injects link faults between a source cairnd and its sink.

    proxy = FaultProxy(target_port=sink_port, seed=7).start()
    # the source's [volume] peer = 127.0.0.1:<proxy.port>
    proxy.cut()          # drop every connection, refuse new ones ...
    proxy.heal()         # ... until healed
    proxy.delay(0.05)    # hold every chunk 50 ms before forwarding it
    proxy.flip_bits(3)   # one random bit flipped in each of the next 3 chunks source -> sink
    proxy.stop()

Stdlib only, threads. It binds 127.0.0.1 only. Per connection there are two
pump threads (source -> sink "up", sink -> source "down"). A clean end of
one direction (FIN) is passed on as a half-close; when a direction fails or
the link is cut, both sockets are shut down so both peers see the link
close at once; the sockets are closed once both pumps have returned (a
socket is never closed under a thread that still uses it). stop() joins every
thread it started; `threads_alive()` lets a test check that nothing leaked.

A "chunk" is what one recv() returned (at most CHUNK bytes). Bit flips are
chosen by a random.Random(seed), so a failing run can be replayed; every flip
is recorded in `flips` as (connection number, offset in that connection's
source -> sink stream, bit) and logged.
"""
import logging
import random
import socket
import threading
import time

log = logging.getLogger("fault_proxy")

CHUNK = 64 * 1024


class _Conn:
    """One proxied connection: the source side, the sink side, two pumps."""

    def __init__(self, proxy, number, client, upstream):
        self.proxy = proxy
        self.number = number
        self.client = client
        self.upstream = upstream
        self.up_offset = 0  # bytes of the source -> sink stream forwarded so far
        self._lock = threading.Lock()
        self._shut = False
        self._eofs = 0
        self.up = threading.Thread(target=self._run_up, name=f"fault-proxy-{number}-up",
                                   daemon=True)
        self.down = threading.Thread(target=self._pump, name=f"fault-proxy-{number}-down",
                                     args=(upstream, client, False), daemon=True)

    def start(self):
        self.down.start()
        self.up.start()

    def shutdown(self):
        """Both directions, both peers: wakes the pumps blocked in recv()."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run_up(self):
        try:
            self._pump(self.client, self.upstream, True)
        finally:
            self.down.join()
            for s in (self.client, self.upstream):
                try:
                    s.close()
                except OSError:
                    pass
            self.proxy._forget(self)

    def _pump(self, src, dst, up):
        p = self.proxy
        clean_eof = False
        try:
            while not p._stopping.is_set():
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    break
                if self._shut:
                    break
                if not data:
                    clean_eof = True
                    break
                d = p._delay
                if d > 0 and p._wake.wait(d):
                    break  # cut or stop while the chunk was held: it is dropped
                if self._shut:
                    break
                if up:
                    data = p._maybe_flip(self, data)
                try:
                    dst.sendall(data)
                except OSError:
                    break
                with p._lock:
                    if up:
                        p.bytes_up += len(data)
                        self.up_offset += len(data)
                    else:
                        p.bytes_down += len(data)
        finally:
            if clean_eof:
                # A half-close travels on: the other direction may still carry
                # the peer's last words (a LinkError, an ack).
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    self.shutdown()
                with self._lock:
                    self._eofs += 1
                    both = self._eofs == 2
                if both:
                    self.shutdown()
            else:
                self.shutdown()


class FaultProxy:
    """127.0.0.1:port -> target_host:target_port, with faults on demand."""

    def __init__(self, target_port, target_host="127.0.0.1", port=0, seed=0,
                 connect_timeout=5.0):
        self.target = (target_host, target_port)
        self._want_port = port
        self.port = None
        self._rng = random.Random(seed)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake = threading.Event()  # set by cut()/stop(): ends held chunks
        self._cut = False
        self._delay = 0.0
        self._flips_pending = 0
        self._conns = set()
        self._listener = None
        self._accept_thread = None
        self._started_threads = []
        # Counters (read them any time; they only grow).
        self.bytes_up = 0          # source -> sink, forwarded
        self.bytes_down = 0        # sink -> source, forwarded
        self.connections = 0       # accepted and forwarded
        self.refused = 0           # accepted while cut, closed at once
        self.cuts = 0
        self.flips = []            # (connection number, stream offset, bit)

    # -- lifecycle ---------------------------------------------------------

    def start(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self._want_port))
        s.listen(16)
        self._listener = s
        self.port = s.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop,
                                               name="fault-proxy-accept", daemon=True)
        self._accept_thread.start()
        log.info("fault proxy 127.0.0.1:%d -> %s:%d", self.port, *self.target)
        return self

    def stop(self, timeout=10.0):
        """Closes the listener and every connection; joins every thread."""
        self._stopping.set()
        self._wake.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown()
        deadline = time.monotonic() + timeout
        for t in self._started_threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = self.threads_alive()
        if alive:
            raise RuntimeError(f"fault proxy threads still running after stop: {alive}")

    def threads_alive(self):
        ts = list(self._started_threads)
        if self._accept_thread is not None:
            ts.append(self._accept_thread)
        return [t.name for t in ts if t.is_alive()]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- faults ------------------------------------------------------------

    def cut(self):
        """Closes every current connection (both directions) and closes every
        new one at once, until heal()."""
        with self._lock:
            self._cut = True
            self.cuts += 1
            conns = list(self._conns)
            self._wake.set()
        for c in conns:
            c.shutdown()
        log.info("fault proxy: link cut (%d connections closed)", len(conns))

    def heal(self):
        with self._lock:
            self._cut = False
            if not self._stopping.is_set():
                self._wake.clear()
        log.info("fault proxy: link healed")

    def delay(self, seconds):
        """Holds every chunk, both directions, this long before forwarding it."""
        self._delay = float(seconds)

    def flip_bits(self, n):
        """Flips one random bit in each of the next n chunks source -> sink."""
        with self._lock:
            self._flips_pending += n

    @property
    def flips_pending(self):
        with self._lock:
            return self._flips_pending

    @property
    def active_connections(self):
        with self._lock:
            return len(self._conns)

    # -- internals ---------------------------------------------------------

    def _maybe_flip(self, conn, data):
        with self._lock:
            if self._flips_pending <= 0:
                return data
            self._flips_pending -= 1
            i = self._rng.randrange(len(data))
            bit = self._rng.randrange(8)
            self.flips.append((conn.number, conn.up_offset + i, bit))
        log.info("fault proxy: flipped bit %d of byte %d of connection %d", bit,
                 conn.up_offset + i, conn.number)
        b = bytearray(data)
        b[i] ^= 1 << bit
        return bytes(b)

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)

    def _accept_loop(self):
        number = 0
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                cut = self._cut
                if cut:
                    self.refused += 1
            if cut or self._stopping.is_set():
                _close_now(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=self._connect_timeout)
                upstream.settimeout(None)
            except OSError as e:
                log.info("fault proxy: cannot reach %s:%d: %s", *self.target, e)
                _close_now(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            number += 1
            conn = _Conn(self, number, client, upstream)
            with self._lock:
                if self._cut or self._stopping.is_set():
                    self.refused += 1
                    _close_now(client)
                    _close_now(upstream)
                    continue
                self.connections += 1
                self._conns.add(conn)
                self._started_threads.extend([conn.up, conn.down])
                # Threads that ended are dropped from the list (they were joined
                # by their connection, or will be by stop()).
                self._started_threads = [t for t in self._started_threads
                                         if t.is_alive() or t in (conn.up, conn.down)]
            conn.start()


def _close_now(s):
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()
