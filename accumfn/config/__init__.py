"""Settings and the advice about them. No torch: ``accumfn plan`` reads them without it.

- ``_settings``: ``AccumulationConfig``, the accumulation settings of a config file,
  checked on construction (``from_yaml``, ``from_mapping``, the readers of config stacks).
- ``_yaml``: a YAML file read as YAML 1.2 says (ruamel.yaml), duplicate keys refused.
- ``_names``: the one table of other trainers' names for the settings, and nesting checks.
- ``_steps``: ``gradient_accumulation_steps`` as an int or an epoch schedule's text.
- ``_advice``: ``accumfn plan --config``, the effective batch table and learning-rate advice.
- ``plan``: ``plan_window``, the window that reaches a target batch.
- ``lr``: ``scale_lr``, learning-rate scaling for a larger effective batch (advice only).
"""

from ._advice import clipping_text as clipping_text
from ._advice import format_batch_table as format_batch_table
from ._advice import format_lr_advice as format_lr_advice
from ._advice import plan_text as plan_text
from ._advice import same_batch_rows as same_batch_rows
from ._settings import AccumulationConfig
from ._settings import init_kwargs_of as init_kwargs_of

__all__ = ["AccumulationConfig"]
