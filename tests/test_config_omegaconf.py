"""``OmegaConf.structured(AccumulationConfig)`` under omegaconf 2.3 (what Hydra 1.3 pins) and
2.4: a window of 4 and an epoch schedule from YAML text and dotlist overrides, bad values
refused with accumfn's message.

The main venv has omegaconf 2.3 (for Hydra 1.3); ``.ci/run`` runs this file again in a second
venv with omegaconf 2.4 and ``ACCUMFN_OMEGACONF=2.4``, which this file checks it got.
"""

from __future__ import annotations

import os

import omegaconf
import pytest
from omegaconf import OmegaConf

from accumfn import AccumulationConfig, ConfigError

WINDOW = AccumulationConfig(gradient_accumulation_steps=4, batch_size=8)
SCHEDULE = AccumulationConfig(gradient_accumulation_steps={0: 2, 3: 4}, batch_size=8)


def test_the_omegaconf_asked_for() -> None:
    wanted = os.environ.get("ACCUMFN_OMEGACONF")
    if wanted is not None:
        assert omegaconf.__version__.startswith(wanted), omegaconf.__version__


def test_structured_schema_merged_with_yaml_and_overrides() -> None:
    schema = OmegaConf.structured(AccumulationConfig)
    assert not OmegaConf.is_readonly(schema)  # a file and overrides merge into it
    from_file = OmegaConf.create("batch_size: 8\ngradient_accumulation_steps: 2\n")
    overrides = OmegaConf.from_dotlist(["gradient_accumulation_steps=4"])
    assert OmegaConf.to_object(OmegaConf.merge(schema, from_file, overrides)) == WINDOW
    scheduled = OmegaConf.create("batch_size: 8\ngradient_accumulation_steps: '{0: 2, 3: 4}'\n")
    assert OmegaConf.to_object(OmegaConf.merge(schema, scheduled)) == SCHEDULE
    assert OmegaConf.to_object(OmegaConf.structured(SCHEDULE)) == SCHEDULE  # an instance too
    assert OmegaConf.to_yaml(OmegaConf.structured(WINDOW)).startswith(
        "gradient_accumulation_steps: 4\nbatch_size: 8\nmax_grad_norm: 1.0\n"
    )


def test_bad_values_are_refused() -> None:
    schema = OmegaConf.structured(AccumulationConfig)
    with pytest.raises(ConfigError, match="batch_size must be >= 1, got 0"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"batch_size": 0}))
    with pytest.raises(ConfigError, match="lr_scaling must be one of"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"lr_scaling": "cubic"}))
    with pytest.raises(omegaconf.errors.ValidationError, match="could not be converted"):
        OmegaConf.merge(schema, {"batch_size": "eight"})
    with pytest.raises(omegaconf.errors.ConfigKeyError, match="accumulate_grad_batches"):
        OmegaConf.merge(schema, {"accumulate_grad_batches": 4})  # the schema knows its keys
