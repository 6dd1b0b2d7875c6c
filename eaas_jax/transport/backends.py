"""The transport backends by name: what a deployment's ``transport`` names.

Each backend is one module of this package exposing one ``BACKEND`` object
that implements :class:`TransportBackend`; its endpoints implement
:class:`TransportEndpoint`. Code outside ``transport/`` asks the backend
(``backends.get(deployment.transport)``) instead of testing its name.

A backend module is imported when it is first asked for, not with this one:
``names()`` needs none of them, and each imports fine without its hardware
(``cuda_ipc`` on a machine without CUDA); opening an endpoint is what fails.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from eaas_jax.transport.custom_calls import FfiTargets
    from eaas_jax.transport.directory import EntryStore
    from eaas_jax.transport.wire import Geometry

#: Backend name -> the module whose ``BACKEND`` it is, in the order they are listed.
_MODULES = {
    "shm": "eaas_jax.transport.shm",
    "cuda_ipc": "eaas_jax.transport.cuda_ipc",
    "ibgda": "eaas_jax.transport.ibgda",
}
#: The transport of a deployment that names none.
DEFAULT = "shm"


class UnknownTransportError(ValueError):
    """No backend has that name."""


@runtime_checkable
class TransportEndpoint(Protocol):
    """One open endpoint of a deployment: its inbox, and its view of the peers.

    Also has the four custom calls bound to it (``dispatch``, ``combine``,
    ``poll``, ``reply``: ``custom_calls.BoundCalls``) and closes on leaving
    ``with``.
    """

    deployment: str  #: the name its inbox is found by (a deployment's shm name)
    endpoint: int  #: its index in [0, max_endpoints)
    geometry: Geometry
    ffi_targets: FfiTargets  #: the XLA targets the calls on this endpoint emit

    @property
    def closed(self) -> bool: ...

    def connect(self, peer: int, timeout: float = 0.0) -> None:
        """Maps `peer`'s inbox now (waiting up to `timeout` s for it) and
        checks it matches; sends map peers lazily otherwise."""

    def stats(self) -> dict[str, int]:
        """The endpoint's counters (``native.counter_names()``)."""

    def close(self) -> None:
        """Frees the inbox and what it published (idempotent)."""


@runtime_checkable
class TransportBackend(Protocol):
    """What a deployment needs of its transport."""

    name: str  #: as deployment files and registry entries spell it
    ffi_targets: FfiTargets  #: the XLA custom-call targets its endpoints bind
    #: Its endpoints live on GPUs, one process each: a locally started server
    #: gets a GPU of its own, and replicas sharing one are worth a warning.
    #: Otherwise servers run on the CPU.
    one_process_per_gpu: bool

    def open_endpoint(self, name: str, endpoint: int, geometry: dict,
                      entries: EntryStore | None = None) -> TransportEndpoint:
        """Opens endpoint `endpoint` of the deployment instance `name` (its
        shm name); `geometry`: ``Deployment.geometry``'s keyword arguments;
        `entries`: where it publishes what peers need to reach it and finds
        theirs, when they may be on other hosts (the registry's; None: this
        host's directory). Backends whose peers are on this host by nature
        (shm, cuda_ipc) find them by name and ignore it."""

    def endpoint_paths(self, name: str, endpoint: int) -> tuple[str, ...]:
        """The files endpoint `endpoint` of `name` occupies while open: what
        to remove after its process was killed."""

    def describe(self, endpoint: TransportEndpoint) -> dict:
        """The fields of an open endpoint's registry entry that this backend owns."""

    def deployment_problems(self, deployment) -> list[str]:
        """What a ``Deployment`` asks of this backend that it cannot do, one
        line each (empty: nothing)."""


def foreign_options(deployment, backend: str, takes: frozenset = frozenset()) -> list[str]:
    """What `deployment` sets that only other backends than `backend` take
    (options in `takes` are its own), one line each: ``device`` of servers
    (cuda_ipc) and ``nic`` (ibgda)."""
    problems = []
    if "device" not in takes:
        problems += [f"servers[{i}]: device is for the cuda_ipc transport (this deployment uses {backend!r})"
                     for i, server in enumerate(deployment.servers) if server.device is not None]
    if "nic" not in takes and deployment.nic is not None:
        problems.append(f"nic is for the ibgda transport (this deployment uses {backend!r})")
    return problems


def names() -> tuple[str, ...]:
    """The known backends' names."""
    return tuple(_MODULES)


def get(name: str) -> TransportBackend:
    """The backend called `name`.

    Raises:
      UnknownTransportError: there is none (the message lists the known ones).
    """
    if not isinstance(name, str) or name not in _MODULES:
        raise UnknownTransportError(f"transport must be one of {list(names())}, got {name!r}")
    return importlib.import_module(_MODULES[name]).BACKEND
