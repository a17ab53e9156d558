"""API keys: resolved once where the app is built, checked by the ingress replicas from their hashes.

The keys come from ``serve.api_keys_file`` (one per line, ``#`` starts a comment) and the comma-separated
``QLORA_RAY_API_KEYS`` variable, both read by the process that builds the app (``python -m serve``, the
pipeline, ``serve run``/``serve deploy``'s build step). Replicas on other nodes do not see that process's
environment or files, so they get the keys' SHA-256 hashes as a deployment argument: the raw keys never leave
the building process and are never logged.

A key source that is configured but yields no key is an error, never "auth off"; so is a host other than
loopback without keys, unless ``serve.allow_unauthenticated`` says that is meant.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
from pathlib import Path

from qlora_ray.config import ConfigError, ServeConfig

KEYS_VARIABLE = "QLORA_RAY_API_KEYS"
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}

log = logging.getLogger(__name__)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _refuse(problem: str) -> ConfigError:
    return ConfigError("of the Serve app", [problem])


def _file_keys(path: str) -> set[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise _refuse(f"serve.api_keys_file: {path} cannot be read ({err}); create it (one key per line) "
                      "or unset serve.api_keys_file") from None  # fmt: skip
    keys = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    if not keys:
        raise _refuse(f"serve.api_keys_file: {path} holds no key (only blank lines or comments); add one key per "
                      "line, or unset serve.api_keys_file to serve without keys")  # fmt: skip
    return keys


def _variable_keys() -> set[str]:
    if KEYS_VARIABLE not in os.environ:
        return set()
    keys = {k.strip() for k in os.environ[KEYS_VARIABLE].split(",") if k.strip()}
    if not keys:
        raise _refuse(f"{KEYS_VARIABLE} is set but holds no key; set it to comma-separated keys, or unset it "
                      "to serve without keys")  # fmt: skip
    return keys


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:  # a host name: it may resolve anywhere
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def _checked(keys: set[str], source: str) -> set[str]:
    """Keys as a client can send them: printable ASCII without spaces (a header cannot carry more)."""
    for key in keys:
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            raise _refuse(f"{source} holds a key with spaces or characters other than printable ASCII, which "
                          "no client can send in an Authorization header; a comment takes a whole line")  # fmt: skip
    return keys


def api_keys(cfg: ServeConfig) -> set[str]:
    """Every accepted key (empty: auth off); a configured source without a key is a :class:`ConfigError`.

    Only the process that builds the app (and asks it a question, as the pipeline does) holds these.
    """
    keys = _checked(_variable_keys(), KEYS_VARIABLE)
    if cfg.api_keys_file:
        keys |= _checked(_file_keys(cfg.api_keys_file), f"serve.api_keys_file {cfg.api_keys_file}")
    return keys


def key_hashes(cfg: ServeConfig) -> list[str]:
    """The hashes of every accepted key (empty: auth off), after the checks in the module docstring."""
    keys = api_keys(cfg)
    if not keys and not is_loopback(cfg.host):
        if not cfg.allow_unauthenticated:
            raise _refuse(
                f"serve.host is {cfg.host}, which others can reach, and no API key is set: set serve.api_keys_file "
                f"or {KEYS_VARIABLE}, bind to 127.0.0.1, or set serve.allow_unauthenticated: true if the port is "
                "guarded otherwise"
            )
        log.warning("serving on %s without API keys (serve.allow_unauthenticated): anyone who reaches the port "
                    "can use it", cfg.host)  # fmt: skip
    return sorted(digest(k) for k in keys)


def accepts(hashes: list[str], header: str) -> bool | None:
    """Whether an ``Authorization`` header carries an accepted key: None when it carries no bearer key."""
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    presented = digest(key)
    matches = [hmac.compare_digest(presented, h) for h in hashes]  # every hash compared: no early exit
    return any(matches)
