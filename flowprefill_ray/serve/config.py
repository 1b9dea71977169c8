"""Arguments of the Serve app builder, validated once at deploy time.

A Serve config passes ``args`` to ``flowprefill_ray.serve.app:build_app``; they are three
concerns, each its own model:

- ``runtime``: the engine (``flowprefill_ray.runtime.config.RuntimeConfig``: model source,
  worker counts and resources, SLO classes and the default class, policy, request bounds);
- ``api``: the HTTP front end (served model name, API key variable, body size limit);
- ``ingress``: the ingress replicas' leases on the engine service (client_leases.py).

Example (YAML)::

    args:
      runtime:
        model: {path: default}
        placement: {num_prefill_workers: 2, num_decode_workers: 1}
        policy: {name: flowprefill}
        requests: {default_slo_class: text}
      api:
        api_key_env: FLOWPREFILL_API_KEY
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flowprefill_ray.runtime.config import RuntimeConfig

_ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class APIConfig(BaseModel):
    """The HTTP API's own settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Name clients put in "model"; None = derived from the model source (see served_name()).
    served_model_name: str | None = Field(None, min_length=1, max_length=256)
    # Name of the environment variable holding the Bearer API key; None = no key required.
    # The key itself never appears in a config file.
    api_key_env: str | None = None
    # Bodies larger than this (bytes) are refused with 413 before they are parsed.
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    # A body still arriving after this many seconds is refused with 408 (slow-body clients).
    body_read_timeout_s: float = Field(30.0, gt=0, le=600, allow_inf_nan=False)
    # max_tokens of a request that sends none (tokens; still capped by the context left).
    default_max_tokens: int = Field(256, ge=1)

    @field_validator("api_key_env")
    @classmethod
    def _env_var_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_VAR_NAME.match(value):
            raise ValueError(
                f"api_key_env must be the NAME of an environment variable (letters, digits, "
                f"underscore), not {value!r}; never put the key itself in the config"
            )
        return value


class IngressConfig(BaseModel):
    """How the engine service tells a dead ingress replica from a live one (client_leases.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A replica that has not renewed its lease for this long is taken for dead: the engine
    # cancels the requests it had in flight (seconds).
    lease_s: float = Field(10.0, gt=0, le=600, allow_inf_nan=False)
    # How often each replica renews its lease with its in-flight request ids (seconds).
    renew_interval_s: float = Field(0.5, gt=0, le=60, allow_inf_nan=False)

    @model_validator(mode="after")
    def _renewals_fit_in_a_lease(self) -> IngressConfig:
        if self.renew_interval_s * 3 > self.lease_s:
            raise ValueError(
                f"ingress.renew_interval_s ({self.renew_interval_s:g}) must be at most a third "
                f"of ingress.lease_s ({self.lease_s:g}): one late renewal must not expire a "
                "live replica's lease"
            )
        return self


class ServeAppArgs(BaseModel):
    """Everything ``build_app`` takes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtime: RuntimeConfig = RuntimeConfig()
    api: APIConfig = APIConfig()
    ingress: IngressConfig = IngressConfig()

    def served_model_name(self) -> str:
        """The model id of /v1/models and the only accepted ``model`` value."""
        if self.api.served_model_name:
            return self.api.served_model_name
        source = self.runtime.model.path
        if source == "tiny":
            return "flowprefill-tiny"
        if source == "default":
            return "SmolLM2-135M-Instruct"
        return Path(source).name
