"""pydantic reads AccumulationConfig as accumfn does: an unknown key (another trainer's name
too) is refused, never dropped, and no value is coerced into a setting."""

from __future__ import annotations

import json

import pytest

from accumfn import AccumulationConfig

pydantic = pytest.importorskip("pydantic")
ADAPTER = pydantic.TypeAdapter(AccumulationConfig)


@pytest.mark.parametrize("key", ["accumulate_grad_batches", "gradient_accumulation_step"])
def test_an_unknown_key_is_refused_not_dropped(key: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=f"{key}\n  Unexpected keyword argument"):
        ADAPTER.validate_json(json.dumps({key: 4}))
    with pytest.raises(pydantic.ValidationError, match="Unexpected keyword argument"):
        ADAPTER.validate_python({key: 4})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("gradient_accumulation_steps", True),
        ("gradient_accumulation_steps", 4.0),
        ("batch_size", "8"),
        ("batch_size", 8.0),
        ("skip_nonfinite", "yes"),
        ("sync_every_micro_step", 1),
        ("max_grad_norm", "1.0"),
    ],
)
def test_no_value_is_coerced(field: str, value: object) -> None:
    with pytest.raises(pydantic.ValidationError, match=field):
        ADAPTER.validate_json(json.dumps({field: value}))
    with pytest.raises(pydantic.ValidationError, match=field):
        ADAPTER.validate_python({field: value})


def test_what_is_written_as_meant_still_validates() -> None:
    text = json.dumps(
        {"gradient_accumulation_steps": "{0: 2, 3: 4}", "batch_size": 8, "max_grad_norm": 1}
    )
    config = ADAPTER.validate_json(text)
    assert config == AccumulationConfig(gradient_accumulation_steps={0: 2, 3: 4}, batch_size=8)
    assert ADAPTER.validate_json(ADAPTER.dump_json(config)) == config
    schema = ADAPTER.json_schema()
    assert "clipped" in schema["properties"]["max_grad_norm"]["description"]
    assert schema["additionalProperties"] is False
