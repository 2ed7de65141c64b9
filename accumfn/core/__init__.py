"""The pure core: frozen records and the transitions that decide every step. No torch.

The argument checks (``check_count``, ...) are shared with the layers above, so that every
layer says the same thing about the same mistake.
"""

from ._agree import (
    CLOSE,
    ITEMS_COLUMN,
    LOSS_COLUMN,
    OPEN,
    RESUME,
    SCALE_COLUMN,
    WIDTH,
    RankView,
    WindowTotals,
    agree,
    agree_at_open,
    agree_open,
    agree_resume,
    check_counted_items,
    float_bits,
    identity_problem,
    open_view,
    resume_view,
    window_header,
    window_view,
)
from ._checks import check_choice as check_choice
from ._checks import check_count as check_count
from ._checks import check_positive_float as check_positive_float
from ._checks import closest as closest
from ._schedule import (
    ByEpoch,
    ByStep,
    CallerClosed,
    Constant,
    Schedule,
    StepsSpec,
    schedule_from,
)
from ._serialize import FORMAT
from ._state import (
    DEFAULT_MAX_GRAD_NORM,
    AccumConfig,
    AccumState,
    MicroPlan,
    Normalization,
    window_progress,
)
from ._transitions import (
    ON_DEVICE,
    check_state,
    check_step_scaler,
    close_window,
    closes_window,
    finish_step,
    init,
    micro_step,
    rescale_in_step,
    start_epoch,
    sync_next_forward,
    window_after,
)

__all__ = [
    "CLOSE",
    "DEFAULT_MAX_GRAD_NORM",
    "FORMAT",
    "ITEMS_COLUMN",
    "LOSS_COLUMN",
    "ON_DEVICE",
    "OPEN",
    "RESUME",
    "SCALE_COLUMN",
    "WIDTH",
    "AccumConfig",
    "AccumState",
    "ByEpoch",
    "ByStep",
    "CallerClosed",
    "Constant",
    "MicroPlan",
    "Normalization",
    "RankView",
    "Schedule",
    "StepsSpec",
    "WindowTotals",
    "agree",
    "agree_at_open",
    "agree_open",
    "agree_resume",
    "check_counted_items",
    "check_state",
    "check_step_scaler",
    "close_window",
    "closes_window",
    "finish_step",
    "float_bits",
    "identity_problem",
    "init",
    "micro_step",
    "open_view",
    "rescale_in_step",
    "resume_view",
    "schedule_from",
    "start_epoch",
    "sync_next_forward",
    "window_after",
    "window_header",
    "window_progress",
    "window_view",
]
