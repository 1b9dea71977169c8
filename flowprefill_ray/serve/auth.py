"""Optional Bearer API key for the HTTP API.

The key is read once from an environment variable named in the app config, so the secret
never appears in a config file or a manifest (on Kubernetes it comes from a Secret).
"""

from __future__ import annotations

import hmac
import os

from .errors import APIError


class APIKeyCheck:
    """Checks ``Authorization: Bearer <key>`` against the configured key.

    With no key configured every request passes. The comparison is constant-time
    (``hmac.compare_digest``) so response timing does not leak how much of a guess was right.
    """

    def __init__(self, api_key: str | None) -> None:
        self._key = api_key.encode() if api_key else None

    @classmethod
    def from_env(cls, env_var: str | None) -> APIKeyCheck:
        """Build from the variable named ``env_var``; a named but unset or empty variable is a
        deployment error, because silently serving without the key would be unsafe."""
        if env_var is None:
            return cls(None)
        value = os.environ.get(env_var, "")
        if not value:
            raise ValueError(
                f"api_key_env is {env_var!r} but that environment variable is unset or empty "
                "in the Serve replica; set it (e.g. runtime_env.env_vars or a k8s Secret) "
                "or remove api_key_env to serve without an API key"
            )
        return cls(value)

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def check(self, authorization: str | None) -> None:
        """Raise a 401 ``APIError`` unless the header carries the right Bearer key."""
        if self._key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        if not hmac.compare_digest(token.strip().encode(), self._key):
            raise _unauthorized("Incorrect API key.")


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
