"""TTFT / TPOT service-level objectives per request class.

A request names a class (``text``, ``image``, ...); the class gives absolute latency targets.
The defaults mirror the FlowPrefill benchmark for Llama-3.1-8B on one A800: text 0.25 s,
image 0.5 s, search 4.0 s, file 6.0 s (about 1 : 2 : 16 : 24). ``scale`` multiplies every
target, which is how SLO-scale sweeps (0.4 .. 2.0) are expressed.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator


class UnknownSLOClassError(KeyError):
    """A request named an SLO class that the configuration does not define."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0])


class SLOClass(BaseModel):
    """One class of requests and its latency targets (seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    ttft_slo_s: PositiveFloat = Field(description="time-to-first-token target, seconds")
    tpot_slo_s: PositiveFloat = Field(description="time-per-output-token target, seconds")


def default_slo_classes() -> list[SLOClass]:
    """The paper's four classes (Llama-3.1-8B, A800) with a 0.1 s TPOT target each."""
    return [
        SLOClass(name="text", ttft_slo_s=0.25, tpot_slo_s=0.1),
        SLOClass(name="image", ttft_slo_s=0.5, tpot_slo_s=0.1),
        SLOClass(name="search", ttft_slo_s=4.0, tpot_slo_s=0.1),
        SLOClass(name="file", ttft_slo_s=6.0, tpot_slo_s=0.1),
    ]


class SLOConfig(BaseModel):
    """The set of SLO classes, the class used when a request names none, and a scale."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: list[SLOClass] = Field(default_factory=default_slo_classes, min_length=1)
    default_class: str = "text"
    scale: PositiveFloat = Field(1.0, description="multiplies every TTFT and TPOT target")

    @model_validator(mode="after")
    def _check_names(self) -> SLOConfig:
        names = [c.name for c in self.classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"SLO class names must be unique; repeated: {duplicates}")
        if self.default_class not in names:
            raise ValueError(
                f"default_class {self.default_class!r} is not one of the classes {names}"
            )
        return self

    @cached_property
    def _scaled(self) -> dict[str, SLOClass]:
        # Resolved once: resolve() is on the arrival path of every request.
        return {
            c.name: SLOClass(
                name=c.name,
                ttft_slo_s=c.ttft_slo_s * self.scale,
                tpot_slo_s=c.tpot_slo_s * self.scale,
            )
            for c in self.classes
        }

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def resolve(self, name: str | None) -> SLOClass:
        """The class called ``name`` (``None``: the default class) with its targets scaled.

        Raises ``UnknownSLOClassError`` listing the known classes.
        """
        key = self.default_class if name is None else name
        try:
            return self._scaled[key]
        except KeyError:
            raise UnknownSLOClassError(
                f"unknown SLO class {key!r}; known classes: {self.class_names}"
            ) from None


DEFAULT_SLO_CONFIG = SLOConfig()
