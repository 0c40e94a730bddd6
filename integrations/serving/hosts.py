"""Which web pages and host names may reach the server: the ``Host`` and ``Origin`` checks.

A reward server on 127.0.0.1 is still reachable from any web page open on the machine: a page can
POST a multipart form across origins without a CORS preflight (a "simple request"), and a page
on a DNS-rebinding domain can even read the answers, because its requests carry ``Host:
attacker.example`` while they land on the loopback port. :class:`HostPolicy` closes both:

* ``Host``: only names in ``--allowed-hosts`` (default: the loopback names, plus the ``--host``
  address when it is a specific one) are answered; others get 400 (:class:`HostNotAllowed`).
  ``/health`` and ``/ready`` are exempt, for probes that address the machine by another name.
* ``Origin``: browsers send it on cross-origin POSTs; a state-changing request (any method but
  GET, HEAD, OPTIONS) that carries an ``Origin`` outside ``--allowed-origins`` (default: none)
  gets 403 (:class:`OriginNotAllowed`). Scripts and trainers send no ``Origin`` and pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import HostNotAllowed, OriginNotAllowed

__all__ = ["HostPolicy", "host_name"]

#: Methods that do not change state: no ``Origin`` check.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Bind addresses that mean "every interface": not a name clients use.
_WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


def host_name(value: str) -> str:
    """The host part of a ``Host`` header, lower case, without port, brackets or trailing dot
    (``"[::1]:8000"`` -> ``"::1"``, ``"LocalHost.:80"`` -> ``"localhost"``)."""
    v = value.strip().lower()
    if v.startswith("["):
        v = v[1:].partition("]")[0]
    elif v.count(":") == 1:
        v = v.partition(":")[0]
    return v.rstrip(".")


class HostPolicy:
    """The ``Host`` and ``Origin`` checks of one server.

    Args:
        allowed_hosts: host names answered (``"*"``: any).
        allowed_origins: origins (``scheme://host[:port]``) allowed to POST (``"*"``: any).
        bind_host: the address the server binds; added to the hosts when it is a specific one.
    """

    def __init__(
        self,
        allowed_hosts: Iterable[str],
        allowed_origins: Iterable[str] = (),
        bind_host: str | None = None,
    ) -> None:
        hosts = {host_name(h) for h in allowed_hosts}
        if bind_host is not None and bind_host.strip() not in _WILDCARD_BINDS:
            hosts.add(host_name(bind_host))
        self.any_host = "*" in hosts
        self.hosts = frozenset(hosts - {"*"})
        origins = {o.strip().lower().rstrip("/") for o in allowed_origins}
        self.any_origin = "*" in origins
        self.origins = frozenset(origins - {"*"})

    def refusal(
        self, method: str, headers: Mapping[str, str], open_path: bool
    ) -> HostNotAllowed | OriginNotAllowed | None:
        """The error refusing this request, or None.

        Args:
            method: the HTTP method.
            headers: request headers, names in lower case.
            open_path: a probe endpoint (``/health``, ``/ready``): no ``Host`` check.
        """
        host = headers.get("host")
        if host is not None and not open_path and not self.any_host:
            if host_name(host) not in self.hosts:
                return HostNotAllowed(
                    f"Host {host!r} is not one this server answers to ({sorted(self.hosts)}); "
                    "start it with --allowed-hosts NAME to add one"
                )
        origin = headers.get("origin")
        if origin is not None and method.upper() not in SAFE_METHODS and not self.any_origin:
            if origin.strip().lower().rstrip("/") not in self.origins:
                return OriginNotAllowed(
                    f"requests from web pages of origin {origin!r} are refused; start the server "
                    "with --allowed-origins ORIGIN to let one in"
                )
        return None
