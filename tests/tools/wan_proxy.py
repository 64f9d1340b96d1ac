#!/usr/bin/env python3
"""A TCP proxy that shapes a link between sites: each direction paced to
RATE bytes per second (a token bucket of BURST bytes), every byte counted.

tc netem is not available on these kernels, so the bench's WAN rows run
the link through this: the source's peer is the proxy, the proxy's target
the sink. As a module: `WanProxy(target_port, rate_bps).start()`; from the
shell, for trying a setting by hand:

    tests/tools/wan_proxy.py --listen 7500 --target 7410 --rate 100M

(rate in bits per second: 100M, 1G).
"""
import argparse
import asyncio
import threading
import time

CHUNK = 256 * 1024


class WanProxy:
    """Listens on 127.0.0.1 (port 0: any) and forwards every connection to
    127.0.0.1:target_port, each direction at most rate_bps bytes/s."""

    def __init__(self, target_port, rate_bps, listen_port=0, burst=256 * 1024):
        self.target_port = target_port
        self.rate = float(rate_bps)
        self.burst = burst
        self.listen_port = listen_port
        self.port = None
        self.bytes_up = 0    # source -> sink
        self.bytes_down = 0  # sink -> source
        self._loop = None
        self._server = None
        self._thread = None
        self._ready = threading.Event()
        self._error = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="wan-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the WAN proxy did not start listening within 10 s")
        if self._error:
            raise RuntimeError(f"the WAN proxy could not listen: {self._error}")
        return self

    def stop(self):
        if self._loop:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self):
        self._loop = asyncio.new_event_loop()
        try:
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", self.listen_port))
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _serve(self, client_r, client_w):
        try:
            sink_r, sink_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pump(client_r, sink_w, "up"),
                             self._pump(sink_r, client_w, "down"), return_exceptions=True)

    async def _pump(self, reader, writer, direction):
        """Copies until EOF, releasing bytes no faster than the rate. Each
        chunk is due len/rate after the one before (a clock of its own, so a
        late wake-up is made up, not lost); up to `burst` bytes may go at
        once after an idle spell."""
        due = time.monotonic()
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                now = time.monotonic()
                due = max(due, now - self.burst / self.rate) + len(data) / self.rate
                if due > now:  # pacing, not synchronisation: the link's speed
                    await asyncio.sleep(due - now)
                writer.write(data)
                await writer.drain()
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
        finally:
            writer.close()


def parse_rate(text):
    """'100M' / '1G' / '2500000' bits per second -> bytes per second."""
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    t = text.strip().upper()
    bits = float(t[:-1]) * mult[t[-1]] if t and t[-1] in mult else float(t)
    return bits / 8


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--rate", required=True, help="bits per second: 100M, 1G")
    a = ap.parse_args()
    proxy = WanProxy(a.target, parse_rate(a.rate), listen_port=a.listen).start()
    print(f"127.0.0.1:{proxy.port} -> 127.0.0.1:{a.target} at {a.rate}bit/s; Ctrl-C ends",
          flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        proxy.stop()
        print(f"up {proxy.bytes_up} bytes, down {proxy.bytes_down} bytes")


if __name__ == "__main__":
    main()
