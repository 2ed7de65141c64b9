"""An epoch schedule whose keys name one epoch twice is refused, never collapsed to the last
(as text, as YAML, as JSON's text); keys that are not epochs (False, 0.0, non-ASCII digits)
are refused as the other schedule checks refuse them."""

from __future__ import annotations

from pathlib import Path

import pytest

from accumfn import AccumulationConfig, ConfigError


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ("{0: 2, 0: 4}", "names epoch 0 twice (0: 2 and 0: 4)"),
        ('{"0": 2, "0": 4}', "names epoch 0 twice ('0': 2 and '0': 4)"),
        ({0: 2, "0": 4}, "names epoch 0 twice (0: 2 and '0': 4)"),
        ("{3: 2, ' 3': 4}", "names epoch 3 twice"),
        ("{0: 2, False: 4}", "schedule epoch must be an int >= 0, got False of type bool"),
        ("{0: 2, 0.0: 4}", "schedule epoch must be an int >= 0, got 0.0 of type float"),
        ({"²": 2}, "schedule epoch must be an int >= 0, got '²' of type str"),
        ({"٣": 2}, "schedule epoch must be an int >= 0, got '٣' of type str"),
    ],
)
def test_keys_that_collide_or_are_not_epochs_are_refused(schedule: object, words: str) -> None:
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is") as error:
        AccumulationConfig(gradient_accumulation_steps=schedule)  # type: ignore[arg-type]
    assert words in str(error.value)


@pytest.mark.parametrize(
    "line", ["{0: 2, '0': 4}", "'{0: 2, 0: 4}'", "{0: 2, '²': 4}", '\'{"0": 2, "0": 4}\'']
)
def test_a_yaml_schedule_is_refused_the_same(line: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"training:\n  gradient_accumulation_steps: {line}\n")
    with pytest.raises(ConfigError, match=f"^{path} \\[training\\]: "):
        AccumulationConfig.from_yaml(path)


def test_distinct_epochs_written_either_way_are_read() -> None:
    config = AccumulationConfig(gradient_accumulation_steps={"3": 4, 0: 2})  # type: ignore[arg-type]
    assert config.schedule == {0: 2, 3: 4}
    assert AccumulationConfig(gradient_accumulation_steps='{"0": 2, "3": 4}') == config
