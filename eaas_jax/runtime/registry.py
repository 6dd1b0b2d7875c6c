"""The etcd registry: servers announce themselves under a lease, clients look.

Talks to etcd's v3 API through its JSON gateway (`POST /v3/kv/put` etc.) with
the standard library, so the registry needs no client package (etcd >= 3.4).
Keys (values are JSON):

    eaas/<deployment>/servers/<server name>   {"endpoint", "shm_name", "pid", "host", ...}
    eaas/<deployment>/clients/<slot>          {"pid", "host"}

Every key is attached to its owner's lease; a `Heartbeat` thread keeps the lease
alive, so a process that dies loses its keys after the lease TTL.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

log = logging.getLogger(__name__)


class RegistryError(RuntimeError):
    """The registry could not be reached or refused a request."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    """The key just past every key starting with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class EtcdRegistry:
    """A connection to etcd given as `etcd://HOST:PORT`."""

    def __init__(self, url: str, *, timeout: float = 5.0):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "etcd" or not parsed.hostname or not parsed.port:
            raise ValueError(f"registry must look like etcd://HOST:PORT, got {url!r}")
        self.url = url
        self._base = f"http://{parsed.hostname}:{parsed.port}/v3"
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.url!r})"

    def _call(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self._base + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:300]
            raise RegistryError(f"etcd at {self.url} refused {path}: HTTP {e.code} {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise RegistryError(f"cannot reach etcd at {self.url} ({path}): {e}") from None

    # ------------------------------------------------------------------ leases

    def grant_lease(self, ttl_s: int) -> int:
        return int(self._call("/lease/grant", {"TTL": int(ttl_s)})["ID"])

    def keep_alive(self, lease: int) -> bool:
        """Refreshes `lease`; False if it has already expired."""
        result = self._call("/lease/keepalive", {"ID": lease}).get("result", {})
        return int(result.get("TTL", 0)) > 0

    def revoke_lease(self, lease: int) -> None:
        self._call("/lease/revoke", {"ID": lease})

    # ------------------------------------------------------------------ keys

    def put(self, key: str, value: dict, *, lease: int | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(json.dumps(value))}
        if lease is not None:
            body["lease"] = lease
        self._call("/kv/put", body)

    def create(self, key: str, value: dict, *, lease: int | None = None) -> bool:
        """Writes `key` only if it does not exist; True if this call created it."""
        put = {"key": _b64(key), "value": _b64(json.dumps(value))}
        if lease is not None:
            put["lease"] = lease
        result = self._call("/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": put}],
        })
        return bool(result.get("succeeded", False))

    def delete(self, key: str) -> None:
        self._call("/kv/deleterange", {"key": _b64(key)})

    def get_prefix(self, prefix: str) -> dict[str, dict]:
        result = self._call("/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        out = {}
        for kv in result.get("kvs", []):
            key = _unb64(kv["key"])
            try:
                out[key] = json.loads(_unb64(kv.get("value", "")))
            except ValueError:
                log.warning("ignoring malformed registry entry %s", key)
        return out


def servers_prefix(deployment: str) -> str:
    return f"eaas/{deployment}/servers/"


def clients_prefix(deployment: str) -> str:
    return f"eaas/{deployment}/clients/"


def spares_prefix(deployment: str) -> str:
    """Where a server not in the deployment file claims its spare endpoint."""
    return f"eaas/{deployment}/spares/"


class Heartbeat:
    """A lease kept alive by a daemon thread until `stop()` (which revokes it)."""

    def __init__(self, registry: EtcdRegistry, ttl_s: int = 5):
        self.registry = registry
        self.ttl_s = ttl_s
        self.lease = registry.grant_lease(ttl_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eaas-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.registry.keep_alive(self.lease):
                    log.error("registry lease %x expired; this process is no longer registered", self.lease)
                    return
            except RegistryError as e:
                log.warning("heartbeat failed: %s", e)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.registry.revoke_lease(self.lease)
        except RegistryError as e:  # it expires by itself
            log.warning("could not revoke lease: %s", e)


def wait_for_servers(registry: EtcdRegistry, deployment: str, names, timeout_s: float) -> dict[str, dict]:
    """Waits until every server in `names` is registered; returns their entries."""
    deadline = time.monotonic() + timeout_s
    prefix = servers_prefix(deployment)
    while True:
        found = {k[len(prefix):]: v for k, v in registry.get_prefix(prefix).items()}
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if time.monotonic() >= deadline:
            raise RegistryError(
                f"expert servers {missing} of deployment {deployment!r} did not register in "
                f"{registry.url} within {timeout_s:.0f} s (registered: {sorted(found)})"
            )
        time.sleep(0.1)
