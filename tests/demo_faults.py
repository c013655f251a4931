"""The demo tile server made to misbehave, for tests: 429s with Retry-After, 5xx, cut-off bodies."""

from __future__ import annotations

import threading

from osmseg.demo.server import DemoTileServer, Fault

FAULTS = ("rate_limit_every", "retry_after", "error_every", "error_status", "truncate_every")


class FaultyTileServer(DemoTileServer):
    """A DemoTileServer with fault switches, set at construction or with set_faults:

    * `rate_limit_every=N`: every N-th request (counting all requests) answers 429 with a
      `Retry-After: <retry_after>` header;
    * `error_every=N`: every N-th request answers `error_status` (default 503);
    * `truncate_every=N`: every N-th request that would succeed sends the full Content-Length
      header, half of the body, and closes the connection.

    `latency` and `token` go to the server itself (set_behaviour); set_faults takes them too.
    """

    def __init__(self, seed: int = 0, *, latency: float = 0.0, token: str | None = None, port: int = 0, **faults):
        self._faults = {"rate_limit_every": 0, "retry_after": 1, "error_every": 0, "error_status": 503,
                        "truncate_every": 0}
        self._faults_lock = threading.Lock()
        super().__init__(seed, latency=latency, token=token, port=port)
        self.set_faults(**faults)

    def set_faults(self, **faults) -> None:
        """Change fault switches (and latency or token) while running."""
        behaviour = {name: faults.pop(name) for name in ("latency", "token") if name in faults}
        if behaviour:
            self.set_behaviour(**behaviour)
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise TypeError(f"unknown fault switch(es) {sorted(unknown)}; known: {list(FAULTS)}")
        for name in ("rate_limit_every", "error_every", "truncate_every", "retry_after"):
            if name in faults and (not isinstance(faults[name], int) or faults[name] < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {faults[name]!r}")
        if "error_status" in faults and not 500 <= faults["error_status"] <= 599:
            raise ValueError(f"error_status must be a 5xx status, got {faults['error_status']!r}")
        with self._faults_lock:
            self._faults.update(faults)

    def fault(self, number: int, path: str) -> Fault | None:
        with self._faults_lock:
            faults = dict(self._faults)
        if faults["rate_limit_every"] and number % faults["rate_limit_every"] == 0:
            return Fault(429, {"message": "Too Many Requests"}, {"Retry-After": str(faults["retry_after"])})
        if faults["error_every"] and number % faults["error_every"] == 0:
            return Fault(faults["error_status"], {"message": "Server Error (demo fault)"})
        if faults["truncate_every"] and number % faults["truncate_every"] == 0:
            return Fault(truncate=True)
        return None
