"""Where `ember serve` gets its API key, how it checks one, and when it warns about exposure.

A key typed on the command line shows in `ps` and shell history, so the key may also come from
the `EMBER_API_KEY` environment variable or from a file (`--api-key-file`). The server compares keys
with `hmac.compare_digest` (`app.require_key`), whose time does not depend on how much of the key
matched. A server that
listens beyond the loopback interface without a key is open to anyone who can reach it: it says so.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from ember.errors import EmberError

ENV_KEY = "EMBER_API_KEY"


def resolve_api_key(flag: str | None = None, key_file: str | Path | None = None,
                    environ: dict[str, str] | None = None) -> str | None:
    """The key from `--api-key`, else `--api-key-file`, else `EMBER_API_KEY`; None when none is set.

    Giving both flags is refused (which one was meant?); a file's surrounding whitespace and final
    newline are not part of the key; an empty key is refused, since it would let every client in."""
    environ = os.environ if environ is None else environ
    if flag is not None and key_file is not None:
        raise EmberError("Give the API key once: --api-key or --api-key-file, not both.")
    if key_file is not None:
        path = Path(key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise EmberError(f"API key file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as e:
            raise EmberError(f"Could not read the API key file {path} ({e}).") from None
        where = f"API key file {path}"
    elif flag is not None:
        key, where = flag, "--api-key"
    elif environ.get(ENV_KEY) is not None:
        key, where = environ[ENV_KEY].strip(), ENV_KEY
    else:
        return None
    if not key:
        raise EmberError(f"The API key from {where} is empty.")
    return key


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine without a key, else None."""
    if api_key is not None or is_loopback(host):
        return None
    return (f"warning: listening on {host} without an API key: anyone who can reach this address can use the "
            f"model. Set {ENV_KEY} or pass --api-key-file, or bind 127.0.0.1.")
