"""SLO classes, their validation, and request deadlines."""

import pytest
from pydantic import ValidationError

from flowprefill_ray.scheduling import Request, SLOClass, SLOConfig, UnknownSLOClassError


def test_defaults_mirror_the_paper_ratio():
    slo = SLOConfig()
    targets = [slo.resolve(n).ttft_slo_s for n in ("text", "image", "search", "file")]
    assert targets == [0.25, 0.5, 4.0, 6.0]
    assert slo.resolve(None).name == "text"


def test_scale_multiplies_both_targets():
    slo = SLOConfig(scale=0.4)
    file_class = slo.resolve("file")
    assert file_class.ttft_slo_s == pytest.approx(2.4)
    assert file_class.tpot_slo_s == pytest.approx(0.04)


def test_unknown_class_error_lists_known_classes():
    with pytest.raises(
        UnknownSLOClassError, match=r"'video'.*\['text', 'image', 'search', 'file'\]"
    ):
        SLOConfig().resolve("video")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"classes": [SLOClass(name="a", ttft_slo_s=1, tpot_slo_s=1)] * 2, "default_class": "a"},
            "unique",
        ),
        ({"default_class": "missing"}, "default_class 'missing'"),
        ({"scale": 0.0}, "greater than 0"),
    ],
)
def test_invalid_configs_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        SLOConfig(**kwargs)


def test_class_target_needs_positive_values():
    with pytest.raises(ValidationError):
        SLOClass(name="x", ttft_slo_s=0.0, tpot_slo_s=0.1)


def test_request_deadline_from_class_explicit_and_stamped():
    by_class = Request(request_id="a", arrival_s=10.0, prompt_tokens=8, slo_class="image")
    assert by_class.deadline_s == pytest.approx(10.5)
    explicit = Request(
        request_id="b", arrival_s=10.0, prompt_tokens=8, slo_class="image", ttft_slo_s=2.0
    )
    assert explicit.deadline_s == pytest.approx(12.0)
    # Stamping under a scaled config fixes the class target; an explicit target is kept.
    assert by_class.with_slo(SLOConfig(scale=2.0)).deadline_s == pytest.approx(11.0)
    assert explicit.with_slo(SLOConfig(scale=2.0)).deadline_s == pytest.approx(12.0)


def test_request_validation():
    with pytest.raises(ValidationError, match="prompt_tokens"):
        Request(request_id="a", arrival_s=0.0, prompt_tokens=0)
    with pytest.raises(ValidationError, match="max_output_tokens"):
        Request(request_id="a", arrival_s=0.0, prompt_tokens=1, max_output_tokens=0)
    with pytest.raises(UnknownSLOClassError):
        _ = Request(request_id="a", arrival_s=0.0, prompt_tokens=1, slo_class="nope").deadline_s
