"""The etcd registry: servers announce themselves under a lease, clients look.

Talks to etcd's v3 API through its JSON gateway (`POST /v3/kv/put` etc.) with
the standard library, so the registry needs no client package (etcd >= 3.4).
Keys (values are JSON):

    eaas/<deployment>/servers/<server name>   {"endpoint", "shm_name", "transport", "pid", "host",
                                                "hosted", "deployment_id"}
    eaas/<deployment>/clients/<slot>          {"pid", "host"}

Every key is attached to its owner's lease; a `Heartbeat` thread keeps the lease
alive, so a process that dies loses its keys after the lease TTL. Anyone who
may write these keys can steer clients, so readers check every server entry
before using it (`ServerRegistrations`), and etcd can require a user and
password and a client certificate (`EtcdRegistry`).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

log = logging.getLogger(__name__)

# Where a process finds its etcd credentials when none are passed in: the
# environment, which the expert servers an engine starts inherit, and which,
# unlike a command line, other users of the host cannot read.
ENV_USER = "EAAS_ETCD_USER"
ENV_PASSWORD = "EAAS_ETCD_PASSWORD"
ENV_PASSWORD_FILE = "EAAS_ETCD_PASSWORD_FILE"
ENV_CA_FILE = "EAAS_ETCD_CACERT"
ENV_CERT_FILE = "EAAS_ETCD_CERT"
ENV_KEY_FILE = "EAAS_ETCD_KEY"

# etcd's answers to a token it no longer accepts: simple tokens expire
# `--auth-token-ttl` s (300 by default) after their last use, and every token
# goes stale when users or roles change. A new one fixes both.
_STALE_TOKEN = ("invalid auth token", "revision of auth store is old")


class RegistryError(RuntimeError):
    """The registry could not be reached or refused a request."""


class _Refused(Exception):
    """etcd answered a request with an error (`message` is etcd's)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode(errors="replace")  # anyone may have written it


def _prefix_end(prefix: str) -> str:
    """The key just past every key starting with `prefix` (etcd's range_end)."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


def _setting(value: str | None, env: str) -> str | None:
    """`value` if given, else environment variable `env` (unset or empty: None)."""
    return value if value is not None else os.environ.get(env) or None


def _password(password: str | None) -> str | None:
    """`password` if given, else $EAAS_ETCD_PASSWORD, else the first line of
    the file $EAAS_ETCD_PASSWORD_FILE names."""
    password = _setting(password, ENV_PASSWORD)
    path = os.environ.get(ENV_PASSWORD_FILE)
    if password is not None or not path:
        return password
    try:
        with open(path) as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise RegistryError(f"cannot read the etcd password file {path} ({ENV_PASSWORD_FILE}): "
                            f"{e.strerror}") from None


def _tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context trusting `ca_file` (else the system's CAs) and
    presenting `cert_file`/`key_file` if given (the key may be in cert_file)."""
    if key_file and not cert_file:
        raise RegistryError(f"an etcd client key ({ENV_KEY_FILE}) needs its certificate ({ENV_CERT_FILE})")
    for what, path in (("CA", ca_file), ("client certificate", cert_file), ("client key", key_file)):
        if path and not os.path.isfile(path):
            raise RegistryError(f"etcd {what} file {path} does not exist")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as e:
        raise RegistryError(f"etcd CA file {ca_file} holds no usable certificate: {e}") from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file)
        except ssl.SSLError as e:
            raise RegistryError(f"cannot load the etcd client certificate {cert_file} with key "
                                f"{key_file or '(in the same file)'}: {e}") from None
    return context


class EtcdRegistry:
    """A connection to etcd: `etcd://HOST:PORT` (plain HTTP) or
    `etcds://HOST:PORT` (HTTPS).

    Every setting not passed in is read from the environment:
      user, password: an etcd user (etcd with `auth enable`); $EAAS_ETCD_USER,
        $EAAS_ETCD_PASSWORD or the first line of the file $EAAS_ETCD_PASSWORD_FILE.
      ca_file: the CA that signed etcd's certificate, else the system's CAs
        ($EAAS_ETCD_CACERT); etcds only.
      cert_file, key_file: a client certificate and its key, for etcd's
        `--client-cert-auth` ($EAAS_ETCD_CERT, $EAAS_ETCD_KEY); etcds only.
    """

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 timeout: float = 5.0):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("etcd", "etcds") or not parsed.hostname or not parsed.port:
            raise ValueError(f"registry must look like etcd://HOST:PORT or etcds://HOST:PORT (TLS), got {url!r}")
        self.url = url
        self._base = f"{'https' if parsed.scheme == 'etcds' else 'http'}://{parsed.hostname}:{parsed.port}/v3"
        self._timeout = timeout
        self._ca_file = _setting(ca_file, ENV_CA_FILE)
        self._cert_file = _setting(cert_file, ENV_CERT_FILE)
        key_file = _setting(key_file, ENV_KEY_FILE)
        tls_files = {ENV_CA_FILE: self._ca_file, ENV_CERT_FILE: self._cert_file, ENV_KEY_FILE: key_file}
        if parsed.scheme == "etcds":
            self._tls = _tls_context(self._ca_file, self._cert_file, key_file)
        elif any(tls_files.values()):  # what was meant to go over TLS would not
            given = ", ".join(name for name, path in tls_files.items() if path)
            raise RegistryError(f"TLS files are given ({given}) but {url} is plain HTTP: use etcds://HOST:PORT")
        else:
            self._tls = None
        self._user, self._password = _setting(user, ENV_USER), _password(password)
        if (self._user is None) != (self._password is None):
            raise RegistryError(f"etcd authentication needs both a user ({ENV_USER}) and a password "
                                f"({ENV_PASSWORD} or {ENV_PASSWORD_FILE}); only the "
                                f"{'user' if self._password is None else 'password'} was given")
        self._token: str | None = None  # etcd's auth token, once authenticated
        self._token_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EtcdRegistry({self.url!r})"

    # ------------------------------------------------------------------ requests

    def _post(self, path: str, body: dict, token: str | None) -> dict:
        """One request; raises _Refused when etcd answers with an error."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = token
        request = urllib.request.Request(self._base + path, data=json.dumps(body).encode(), headers=headers,
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._tls) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise _Refused(e.code, _error_message(e.read())) from None
        except urllib.error.URLError as e:
            raise self._unreachable(path, e.reason) from None
        except OSError as e:  # ssl.SSLError included: a refused client certificate shows at the first read
            raise self._unreachable(path, e) from None

    def _unreachable(self, path: str, error) -> RegistryError:
        """The RegistryError for a request that got no answer from etcd."""
        if isinstance(error, ssl.SSLCertVerificationError):
            trusted = f"the CA file {self._ca_file}" if self._ca_file else "the system's CAs"
            return RegistryError(f"etcd at {self.url} presented a certificate that does not verify against "
                                 f"{trusted} ({error.verify_message}); give the CA that signed it ({ENV_CA_FILE})")
        if isinstance(error, ssl.SSLError):
            if self._cert_file is None:
                why = (f"no client certificate was given ({ENV_CERT_FILE}, {ENV_KEY_FILE}): does etcd require one "
                       "(--client-cert-auth)")
            else:
                why = f"does etcd refuse {self._cert_file} (not signed by a CA in its --trusted-ca-file)"
            return RegistryError(f"TLS handshake with etcd at {self.url} failed ({error.reason or error}); {why}, "
                                 "or not serve TLS on that port?")
        if isinstance(error, http.client.RemoteDisconnected) and self._tls is None:
            return RegistryError(f"etcd at {self.url} closed the connection without answering ({path}); if it "
                                 "serves TLS, use etcds://HOST:PORT")
        return RegistryError(f"cannot reach etcd at {self.url} ({path}): {error}")

    def _call(self, path: str, body: dict) -> dict:
        token = self._current_token()
        try:
            return self._post(path, body, token)
        except _Refused as e:
            if token is None or not any(stale in e.message for stale in _STALE_TOKEN):
                raise self._refusal(path, e) from None
        try:  # once more, with a new token
            return self._post(path, body, self._renew_token(token))
        except _Refused as e:
            raise self._refusal(path, e) from None

    def _refusal(self, path: str, refused: _Refused) -> RegistryError:
        """The RegistryError for a request etcd refused."""
        if "user name is empty" in refused.message:
            return RegistryError(f"etcd at {self.url} requires authentication but no user was given: set "
                                 f"{ENV_USER} and {ENV_PASSWORD} or {ENV_PASSWORD_FILE}")
        if "permission denied" in refused.message:
            return RegistryError(f"etcd at {self.url} refused {path} to user {self._user!r}: permission denied "
                                 "(its role needs read and write access to the keys under eaas/)")
        return RegistryError(f"etcd at {self.url} refused {path}: HTTP {refused.status} {refused.message}")

    # ------------------------------------------------------------------ authentication

    def _current_token(self) -> str | None:
        """The token to send: None without credentials; with them, etcd's
        token, asked for at the first request."""
        with self._token_lock:
            if self._token is None and self._user is not None:
                self._token = self._authenticate()
            return self._token

    def _renew_token(self, stale: str) -> str | None:
        """A new token in place of `stale` (one already renewed by another
        thread meanwhile is taken as it is)."""
        with self._token_lock:
            if self._token == stale:
                log.debug("etcd at %s no longer takes our token; authenticating again", self.url)
                self._token = self._authenticate()
            return self._token

    def _authenticate(self) -> str | None:
        """etcd's token for our user; None when etcd has auth disabled."""
        try:
            return self._post("/auth/authenticate", {"name": self._user, "password": self._password}, None)["token"]
        except _Refused as e:
            if "authentication failed" in e.message:
                raise RegistryError(f"etcd at {self.url} refused user {self._user!r}: wrong password or no "
                                    "such user") from None
            if "authentication is not enabled" in e.message:
                log.warning("etcd at %s has authentication disabled: the user given is not needed, and anyone "
                            "who can reach etcd can change the registry", self.url)
                self._user = None
                return None
            raise self._refusal("/auth/authenticate", e) from None

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

    def delete_if_leased(self, key: str, lease: int) -> bool:
        """Deletes `key` only if it is held under `lease` (not a successor's
        key of the same name); True if this call deleted it."""
        result = self._call("/kv/txn", {
            "compare": [{"key": _b64(key), "target": "LEASE", "lease": str(lease)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })
        return bool(result.get("succeeded", False))

    def get_prefix_text(self, prefix: str) -> dict[str, str]:
        """Every key starting with `prefix` and its value as stored (text)."""
        result = self._call("/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in result.get("kvs", [])}

    def get_prefix(self, prefix: str) -> dict[str, dict]:
        """Every key starting with `prefix` and its JSON value (malformed ones left out)."""
        out = {}
        for key, text in self.get_prefix_text(prefix).items():
            try:
                out[key] = json.loads(text)
            except ValueError:
                log.warning("ignoring malformed registry entry %s", key)
        return out


def _error_message(body: bytes) -> str:
    """etcd's message in an error answer of its gateway ({"error", "message", "code"})."""
    text = body.decode(errors="replace")
    try:
        return str(json.loads(text).get("message", text))[:300]
    except (ValueError, AttributeError):
        return text[:300]


def servers_prefix(deployment: str) -> str:
    return f"eaas/{deployment}/servers/"


def clients_prefix(deployment: str) -> str:
    return f"eaas/{deployment}/clients/"


def spares_prefix(deployment: str) -> str:
    """Where a server not in the deployment file claims its spare endpoint."""
    return f"eaas/{deployment}/spares/"


def cards_prefix(deployment: str) -> str:
    """Where endpoints publish what peers on other hosts need to reach them
    (a transport's entry, e.g. the ibgda card), under the endpoint index."""
    return f"eaas/{deployment}/cards/"


class RegistryEntries:
    """A transport's endpoint entries in etcd (a
    ``transport.directory.EntryStore``): how endpoints on different hosts find
    each other. This endpoint's entry is the key ``cards_prefix + endpoint``
    under `lease` (it goes when the process's lease does); peers' entries are
    read with one range request per `refresh_s` at most (the transport asks
    every few milliseconds). Entries are whatever anyone allowed to write the
    registry put there: the transport checks every field it uses; a key that
    is not `cards_prefix` + a decimal endpoint index, or a value that is not a
    JSON object, reads as none, with one warning per value. While etcd cannot
    be reached, reads answer from the last snapshot (warned once)."""

    def __init__(self, registry: EtcdRegistry, deployment: str, endpoint: int, lease: int, *,
                 refresh_s: float = 0.1):
        self.registry, self.prefix, self.endpoint, self.lease = registry, cards_prefix(deployment), endpoint, lease
        self._refresh_s = refresh_s
        self._read_at = -float("inf")
        self._entries: dict[int, dict] = {}
        self._warned: dict[str, str] = {}
        self._unreachable: str | None = None  # the error last warned of
        self._published = False

    @property
    def key(self) -> str:
        return f"{self.prefix}{self.endpoint}"

    def claim(self) -> None:
        pass  # the endpoint itself was claimed in the registry (a server's or client slot's key)

    def publish(self, entry: dict) -> None:
        self.registry.put(self.key, entry, lease=self.lease)
        self._published = True

    def read(self, peer: int) -> dict | None:
        now = time.monotonic()
        if now - self._read_at >= self._refresh_s:
            self._read_at = now
            try:
                texts = self.registry.get_prefix_text(self.prefix)
            except RegistryError as e:
                if self._unreachable != str(e):
                    self._unreachable = str(e)
                    log.warning("cannot read the endpoints' cards (using the last ones read): %s", e)
                return self._entries.get(peer)
            self._unreachable = None
            entries, warned = {}, {}
            for key, text in texts.items():
                name = key[len(self.prefix):]
                try:
                    entry = json.loads(text)
                except (ValueError, RecursionError):
                    entry = None
                if isinstance(entry, dict) and name.isdigit() and str(int(name)) == name:
                    entries[int(name)] = entry
                    continue
                warned[key] = text
                if self._warned.get(key) != text:
                    log.warning("ignoring registry entry %r: not an endpoint's JSON object", key)
            self._entries, self._warned = entries, warned
        return self._entries.get(peer)

    def remove(self) -> None:
        """Withdraws this endpoint's card: only one it published, under its
        own lease (a successor on the same endpoint keeps its card)."""
        if self._published:
            self.registry.delete_if_leased(self.key, self.lease)
            self._published = False


class ServerRegistrations:
    """The server entries of one deployment in etcd, each checked before use.

    etcd holds whatever anyone allowed to write there put, and a bad endpoint
    or hosted list would send tokens astray: `problem_of(name, entry)` says
    what is wrong with an entry (None when nothing is). An entry that is not
    JSON or that it objects to is left out, as if that server had not
    registered, with one warning per value (not one per read)."""

    def __init__(self, registry: EtcdRegistry, deployment: str, problem_of: Callable[[str, object], str | None]):
        self.registry = registry
        self.deployment = deployment
        self.prefix = servers_prefix(deployment)
        self._problem_of = problem_of
        self.rejected: dict[str, str] = {}  # server name -> what is wrong with its entry, as of the last read
        self._warned: dict[str, str] = {}  # key -> the value last warned of

    def read(self) -> dict[str, dict]:
        """Server name -> entry, of the valid entries."""
        valid, rejected, warned = {}, {}, {}
        for key, text in self.registry.get_prefix_text(self.prefix).items():
            name = key[len(self.prefix):]
            try:
                entry = json.loads(text)
            except (ValueError, RecursionError):  # RecursionError: nested too deep
                problem = "its value is not JSON"
            else:
                problem = self._problem_of(name, entry)
            if problem is None:
                valid[name] = entry
                continue
            rejected[name], warned[key] = problem, text
            if self._warned.get(key) != text:
                log.warning("ignoring registry entry %r: %s", key, problem)
        self.rejected, self._warned = rejected, warned
        return valid


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


def wait_for_servers(registrations: ServerRegistrations, names, timeout_s: float) -> dict[str, dict]:
    """Waits until every server in `names` has a valid entry; returns every valid entry."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = registrations.read()
        missing = [n for n in names if n not in found]
        if not missing:
            return found
        if time.monotonic() >= deadline:
            invalid = "".join(f"; {name!r} ignored: {problem}" for name, problem in registrations.rejected.items())
            raise RegistryError(
                f"expert servers {missing} of deployment {registrations.deployment!r} did not register in "
                f"{registrations.registry.url} within {timeout_s:.0f} s (registered: {sorted(found)}{invalid})"
            )
        time.sleep(0.1)
