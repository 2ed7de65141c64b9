"""The model's data-parallel strategy (plain, DDP, FSDP2), resolved once per model.

``strategy(model)`` unwraps ``torch.compile`` wrappers, finds DDP or FSDP2 and the
data-parallel process group(s) they reduce over (DDP's group, FSDP2's mesh, HSDP's two
dims, or a ``process_group=`` given to ``prepare``), and caches the result on the model.
The strategy carries out what the core decides: it sets DDP's sync flag before a forward
and FSDP2's before a backward, exchanges one small header per window so every rank agrees
on the window (``core.agree``), and reduces gradients bucket by bucket when a window closes
after a forward that did not sync.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar, cast

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.amp import GradScaler
from torch.nn.parallel import DistributedDataParallel

from .. import core
from ..errors import ConfigError, RankMismatchError, caller_level
from ..grads import buffers
from ._refused import check_steerable, fsdp_class

__all__ = [
    "BUCKET_BYTES",
    "DataParallel",
    "all_reduce",
    "clear_failures",
    "device_for",
    "exchange",
    "exchange_rows",
    "float_as_bits",
    "gather_objects",
    "note_failure",
    "prepare",
    "set_forward_sync",
    "strategy",
    "write_columns",
    "write_scale",
]

_T = TypeVar("_T")

BUCKET_BYTES = 25 * 1024 * 1024
"""Size of one bucket of the fallback reduction (DDP's default ``bucket_cap_mb``)."""

_TIMEOUT_ENV = "ACCUMFN_SYNC_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0


def _timeout() -> timedelta | None:
    """How long accumfn's own collectives wait (None: as long as it takes)."""
    raw = os.environ.get(_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if seconds == math.inf:
        return None
    if not (math.isfinite(seconds) and 0 < seconds < 10**9):
        raise ConfigError(
            f"{_TIMEOUT_ENV} must be a number of seconds > 0 (or inf: wait as long as it "
            f"takes), got {raw!r}; unset it for the default ({_DEFAULT_TIMEOUT_S:.0f} s)."
        )
    return timedelta(seconds=seconds)


def device_for(group: dist.ProcessGroup | None) -> torch.device:
    """Where a small tensor must live for ``group``'s backend (NCCL takes only CUDA)."""
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` wrappers (``OptimizedModule._orig_mod``)."""
    seen = 0
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and seen < 8:
        model = cast(nn.Module, model._orig_mod)
        seen += 1
    return model


def _fsdp_param_groups(model: nn.Module) -> Iterator[Any]:
    """The FSDP2 parameter groups of ``model``'s ``fully_shard`` modules that hold any."""
    fsdp_type = fsdp_class("FSDPModule")
    for module in model.modules():
        if fsdp_type is None or not isinstance(module, fsdp_type):
            continue
        group = getattr(module._get_fsdp_state(), "_fsdp_param_group", None)  # type: ignore[operator]
        if group is not None:
            yield group


def _fsdp_groups(model: nn.Module) -> list[dist.ProcessGroup]:
    """FSDP2's data-parallel groups: the shard dim, and the replicate dim under HSDP."""
    for group in _fsdp_param_groups(model):
        info = getattr(group, "mesh_info", None)
        if info is None:
            continue
        # FSDP2 shards over one dim; HSDP also replicates over another; FSDP2-based
        # replicate has only the replicate dim
        found = (
            getattr(info, "shard_process_group", None),
            getattr(info, "replicate_process_group", None),
        )
        groups = [dim for dim in found if dim is not None]
        if groups:
            return groups
    raise ConfigError(
        "cannot find the device mesh of this FSDP2 model (no fully_shard module holds "
        "parameters); pass process_group=... to prepare_forward/GradientAccumulator.prepare."
    )


def _steered(inner: nn.Module) -> str | None:
    """ "ddp" or "fsdp2" for a wrapper whose sync accumfn steers, else None."""
    if isinstance(inner, DistributedDataParallel):
        return "ddp"
    fsdp_type = fsdp_class("FSDPModule")
    return "fsdp2" if fsdp_type is not None and isinstance(inner, fsdp_type) else None


class DataParallel:
    """How one model reduces gradients: its kind, groups and the sync flags it obeys."""

    def __init__(self, model: nn.Module, process_group: dist.ProcessGroup | None = None):
        inner = _unwrap(model)
        steered = _steered(inner)
        # Weak references only: the strategy is cached per model and must not keep it alive.
        self._model = weakref.ref(inner)
        self._ddp: weakref.ref[DistributedDataParallel] | None = None
        self._fsdp: weakref.ref[nn.Module] | None = None
        groups: list[dist.ProcessGroup] = []
        if steered == "ddp":
            assert isinstance(inner, DistributedDataParallel)
            self.kind = "ddp"
            self._ddp = weakref.ref(inner)
            own = inner.process_group
            if process_group is not None and process_group is not own:
                raise ConfigError(
                    "process_group differs from the group this DDP model reduces over; drop "
                    "process_group= (DDP's own group is used) or build DDP with that group."
                )
            groups = [own]
            inner.register_forward_hook(_forward_hook(self))
        elif steered == "fsdp2":
            self.kind = "fsdp2"
            self._fsdp = weakref.ref(inner)
            groups = [process_group] if process_group is not None else _fsdp_groups(inner)
        else:
            check_steerable(inner)
            if process_group is not None:
                self.kind = "manual"  # a plain module whose gradients accumfn reduces itself
                groups = [process_group]
            else:
                self.kind = "plain"
        self.groups = groups if dist.is_available() and dist.is_initialized() else []
        self.world = 1
        for group in self.groups:
            self.world *= dist.get_world_size(group)
        self._armed = False
        self._hook_warned = False
        self.failures = 0
        """Window steps of this model that raised since it was built or last resumed."""
        self.guard: Any = None
        """The step layer's guard of this model's open window (``step._guard``)."""
        self.last_failure = ""

    @property
    def model(self) -> nn.Module:
        """The (unwrapped) model; the caller holds it, as it passed the model in."""
        model = self._model()
        if model is None:  # the cache entry goes with the model: never reached
            raise RuntimeError("the model of this strategy was garbage-collected")
        return model

    @property
    def ddp(self) -> DistributedDataParallel | None:
        return None if self._ddp is None else self._ddp()

    @property
    def fsdp(self) -> nn.Module | None:
        return None if self._fsdp is None else self._fsdp()

    # -- sync control -------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return bool(self.groups) and self.world > 1

    def set_forward_sync(self, sync: bool) -> None:
        """DDP decides at forward whether the next backward reduces: set it in advance.

        DDP's ``static_graph`` must sync its first iteration, so it does regardless.
        """
        ddp = self.ddp
        if ddp is not None:
            if ddp.static_graph and not ddp._static_graph_delay_allreduce_enqueued:
                sync = True
            ddp.require_backward_grad_sync = sync

    def set_backward_sync(self, sync: bool) -> None:
        """FSDP2 decides at backward whether it reduce-scatters."""
        fsdp = self.fsdp
        if fsdp is not None:
            fsdp.set_requires_gradient_sync(sync)  # type: ignore[operator]

    def backward_reduces(self) -> bool:
        """Whether the coming backward reduces gradients by itself (DDP: its last forward
        prepared a reducing backward that no backward has consumed yet)."""
        if self.ddp is not None:
            return self._armed
        return self.kind in ("plain", "fsdp2")

    def drop_unreduced_grads(self) -> None:
        """Forget the gradients FSDP2 holds unreduced inside its modules (an open window's,
        summed there until a backward reduce-scatters them), so that a dropped window does
        not reach the next one. Nothing to do for DDP or a plain model: their open windows
        live in ``.grad``."""
        if self.kind != "fsdp2":
            return
        for group in _fsdp_param_groups(self.model):
            for fsdp_param in getattr(group, "fsdp_params", None) or ():
                if not hasattr(fsdp_param, "unsharded_accumulated_grad"):
                    raise ConfigError(
                        "cannot reach the gradients this torch's FSDP2 holds for an open "
                        "window, so reset_epoch cannot drop it: build the state with "
                        "sync_every_micro_step=True (gradients reduced and sharded every "
                        "micro-step), or pass is_final_batch=True on the epoch's last "
                        "micro-batch to apply the window instead."
                    )
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None

    def backward_done(self) -> None:
        self._armed = False

    def refuse_join(self) -> None:
        """ConfigError if DDP is in its ``Join`` mode, for ranks of uneven inputs: it
        shadows only DDP's own collectives, so a rank that ran out of data would leave the
        window's header unanswered. Every rank raises here, at the same micro-step."""
        ddp = self.ddp
        config = None if ddp is None else getattr(ddp, "_join_config", None)
        if config is not None and config.enable:
            raise ConfigError(
                "this DDP model is in Join mode (with Join([model]) or model.join()), which "
                "lets ranks run out of data at different micro-steps; accumfn's window header "
                "is a collective Join cannot stand in for, so such a rank would stall the "
                "others. Drop the Join context (a model once joined stays in Join mode: wrap "
                "the module in a new DDP) and give every rank the same number of windows: the "
                "last one may hold a different number of micro-batches on each rank "
                "(is_final_batch=True on each rank's last one), e.g. with "
                "DistributedSampler(drop_last=True)."
            )

    # -- the window's collectives -------------------------------------------------------------
    def agree(
        self,
        state: core.AccumState,
        *,
        final: bool,
        reduces: bool,
        scaler: GradScaler | None = None,
        items: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
    ) -> tuple[core.WindowTotals, bool, torch.Tensor | None]:
        """Exchange this rank's view of the closing window with the group's ranks and
        decide from all of them (``core.agree``): the window over all ranks, whether the
        gradients need the fallback reduction, and the sum of every rank's ``loss``.
        Raises on every rank alike.

        ``items``: this rank's item count of the window on the device (0-dim int64: the
        counts given as tensors plus the state's; the least one if one was negative),
        ``loss``: the sum of its losses on the device (0-dim float). Both are written into
        this rank's row on the device and read with it: no other read, no other collective.
        On one process ``items`` is read alone (the window's one read).
        """
        if not self.distributed:
            view = core.window_view(state, rank=0, final=final, reduces=reduces)
            if items is not None:
                view = attrs.evolve(view, items=int(items.item()))  # the window's one read
            totals, fallback = core.agree([view])
            return totals, fallback, loss
        view = core.window_view(
            state, rank=dist.get_rank(), final=final, reduces=reduces, failures=self.failures
        )
        columns: dict[int, torch.Tensor] = {}
        if items is not None:
            columns[core.ITEMS_COLUMN] = items
        if loss is not None:
            columns[core.LOSS_COLUMN] = float_as_bits(loss)
        (totals, fallback), rows = self._decide(view, state, scaler, core.agree, columns)
        total = None
        if loss is not None:
            total = rows[:, core.LOSS_COLUMN].contiguous().view(torch.float64).sum()
        return totals, fallback, total

    def agree_open(self, state: core.AccumState, scaler: GradScaler | None = None) -> None:
        """Exchange this rank's view of the window its first micro-step opens
        (``core.agree_at_open``); raises on every rank alike when they differ."""
        if self.distributed:
            view = core.open_view(state, rank=dist.get_rank(), failures=self.failures)
            self._decide(view, state, scaler, core.agree_open)

    def _decide(
        self,
        view: core.RankView,
        state: core.AccumState,
        scaler: GradScaler | None,
        decide: Callable[[list[core.RankView]], _T],
        columns: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[_T, torch.Tensor]:
        """``decide`` over every rank's view, and the gathered rows (on the device)."""
        views, rows = exchange_rows(
            view, self.groups, "the window's header (step, micro-steps, items)", scaler, columns
        )
        try:
            return decide(views), rows
        except RankMismatchError as exc:
            if len({v.settings for v in views}) > 1:
                # Built with other settings: name them (a second exchange, on the way to
                # the error).
                settings = gather_objects(core.settings_of(state.config), self.groups)
                raise RankMismatchError(
                    str(core.identity_problem(views, settings=settings))
                ) from exc
            if len({v.failures for v in views}) == 1:
                raise
            # A step failed on some ranks: say why (a second exchange, on the way to the error).
            notes = gather_notes(self.last_failure, self.groups)
            raise RankMismatchError(str(core.identity_problem(views, notes))) from exc

    def _warn_comm_hook(self) -> None:
        """Once per model: DDP's Python communication hook does not run in accumfn's own
        reduction (the average there is exact; a hook may compress or change it)."""
        ddp = self.ddp
        if ddp is None or self._hook_warned:
            return
        try:  # DDP's logging data names Python and built-in (C++) hooks alike
            logging_data: Any = ddp._get_ddp_logging_data  # (untyped in torch)
            names = logging_data().get("comm_hook")
        except (AttributeError, RuntimeError):
            names = None
        if not names:
            return
        self._hook_warned = True
        warnings.warn(
            f"a window closed after a forward that did not sync (a short final window, a "
            f"window the caller closed, or forwards run before backwards), so accumfn averaged "
            f"its gradients itself, exactly, without DDP's communication hook ({names}); full "
            f"windows keep the hook. Close windows at their planned size, or use "
            f"sync_every_micro_step=True, to run every reduction through it.",
            stacklevel=caller_level(),
        )

    def mean_reduce_grads_(self, wide: torch.dtype | None = None) -> None:
        """Average gradients over the group bucket by bucket (the fallback reduction).

        A gradient that no rank produced stays None, as under DDP and large batch; one that
        only some ranks produced is reduced with zeros from the others. With ``wide`` (the
        accumulation dtype) the wide buffers are reduced where parameters have them.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params or not self.distributed:
            return
        self._warn_comm_hook()

        def source(param: torch.Tensor) -> torch.Tensor | None:
            buffer = None if wide is None else buffers.buffered(param)
            return param.grad if buffer is None else buffer

        present = torch.tensor(
            [source(p) is not None for p in params],
            dtype=torch.int32,
            device=device_for(self.groups[0]),
        )
        for group in self.groups:
            all_reduce(present, group, "which parameters have gradients")
        reduced = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
        grads = []
        for param in reduced:
            grad = source(param)
            if grad is None and wide is not None and param.dtype != wide:
                grad = torch.zeros_like(param, dtype=wide)
                buffers.put(param, grad)
            elif grad is None:
                grad = param.grad = torch.zeros_like(param)
            elif grad.is_sparse:
                raise ConfigError(
                    "the model has sparse gradients, which accumfn's own reduction cannot "
                    "average; it runs when a window closes after a forward that did not "
                    "sync (close windows at their planned size, or use "
                    "sync_every_micro_step=True) and always with accum_dtype under DDP "
                    "(drop accum_dtype)."
                )
            grads.append(grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            if len(bucket) == 1 and bucket[0].is_contiguous():
                # one large gradient: reduce it in place, a bucket-sized slice at a time
                flat = bucket[0].view(-1)
                step = max(1, BUCKET_BYTES // flat.element_size())
                for start in range(0, flat.numel(), step):
                    for group in self.groups:
                        all_reduce(flat[start : start + step], group, "a bucket of gradients")
                flat.div_(self.world)
                continue
            flat = torch.cat([grad.reshape(-1) for grad in bucket])
            for group in self.groups:
                all_reduce(flat, group, "a bucket of gradients")
            flat.div_(self.world)
            for grad, value in zip(
                bucket, torch.split(flat, [g.numel() for g in bucket]), strict=True
            ):
                grad.copy_(value.view_as(grad))
            del flat


def _wait(work: Any, what: str) -> None:
    """Wait for a collective; a hang becomes ``RankMismatchError`` after the timeout."""
    timeout = _timeout()
    if timeout is None:
        work.wait()
        return
    try:
        work.wait(timeout=timeout)
    except RuntimeError as exc:
        raise RankMismatchError(
            f"rank {dist.get_rank()} waited {timeout.total_seconds():.0f} s for the other ranks "
            f"to exchange {what}, and they did not come: the ranks are not running the same "
            f"steps (unequal numbers of micro-batches per rank, a rank that loads or saves "
            f"alone, or a rank that stopped). Give every rank the same number of "
            f"micro-batches (DistributedSampler, drop_last=True) and pass is_final_batch=True "
            f"on each rank's last one; {_TIMEOUT_ENV} sets this wait. ({type(exc).__name__})"
        ) from exc


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None,
    what: str,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> None:
    """All-reduce that turns a hang into ``RankMismatchError`` after ``ACCUMFN_SYNC_TIMEOUT``."""
    _timeout()  # parsed before the collective is issued
    _wait(dist.all_reduce(tensor, op=op, group=group, async_op=True), what)


def exchange(
    view: core.RankView,
    groups: Sequence[dist.ProcessGroup | None],
    what: str,
    scaler: GradScaler | None = None,
) -> list[core.RankView]:
    """Every rank's view, in the same order on every rank (see ``exchange_rows``)."""
    return exchange_rows(view, groups, what, scaler)[0]


def exchange_rows(
    view: core.RankView,
    groups: Sequence[dist.ProcessGroup | None],
    what: str,
    scaler: GradScaler | None = None,
    columns: Mapping[int, torch.Tensor] | None = None,
) -> tuple[list[core.RankView], torch.Tensor]:
    """Every rank's view, in the same order on every rank, and the gathered rows: this
    rank's as one row of int64 on the groups' device (with ``scaler``'s scale and the
    ``columns`` given as device tensors written in there, no host read), one all-gather of
    it per group (two under HSDP), then one host read."""
    _timeout()  # parsed before the collective is issued
    row = torch.tensor(view.to_row(), dtype=torch.int64, device=device_for(groups[0]))
    if scaler is not None:
        write_scale(row, scaler)
    if columns:
        write_columns(row, columns)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    rows = row.view(1, -1)
    for group in groups:
        size = dist.get_world_size(group)
        out = torch.empty(
            (size * rows.shape[0], rows.shape[1]), dtype=rows.dtype, device=rows.device
        )
        _wait(gather(out, rows.contiguous(), group=group, async_op=True), what)
        rows = out
    return [core.RankView.from_row(values) for values in rows.tolist()], rows


def float_as_bits(value: torch.Tensor) -> torch.Tensor:
    """A 0-dim float tensor as the int64 of its float64 bits (``core.float_bits``), on its
    device."""
    return value.detach().reshape(1).to(torch.float64).view(torch.int64)


def write_columns(row: torch.Tensor, columns: Mapping[int, torch.Tensor]) -> None:
    """Write 0-dim int64 tensors into ``row``'s columns: one copy per device they are on
    (none when they are on the row's)."""
    by_device: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
    for column, value in columns.items():
        by_device.setdefault(value.device, []).append((column, value.reshape(1)))
    for pairs in by_device.values():
        values = torch.cat([value.to(torch.int64) for _, value in pairs]).to(row.device)
        for index, (column, _) in enumerate(pairs):
            row[column : column + 1].copy_(values[index : index + 1])


def gather_objects(value: _T, groups: Sequence[dist.ProcessGroup | None]) -> list[_T]:
    """Every rank's ``value`` (picklable), in the order of ``exchange`` (only on the way to
    an error)."""
    values: list[Any] = [value]
    for group in groups:
        out: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(out, values, group=group)
        values = [item for part in out for item in part]
    return values


def gather_notes(note: str, groups: Sequence[dist.ProcessGroup | None]) -> list[str]:
    """Every rank's ``note``, in the order of ``exchange`` (only on the way to an error)."""
    return [str(item) for item in gather_objects(note, groups)]


def write_scale(row: torch.Tensor, scaler: GradScaler) -> None:
    """Put the GradScaler's scale into ``row``'s scale column, on the device (no host read)."""
    scale = getattr(scaler, "_scale", None)
    column = row[core.SCALE_COLUMN : core.SCALE_COLUMN + 1]
    if isinstance(scale, torch.Tensor):
        wide = scale.detach().reshape(1).to(device=row.device, dtype=torch.float64)
        column.copy_(wide.view(torch.int64))
    else:  # not yet made: scale() makes it from the initial scale
        column.fill_(core.float_bits(scaler.get_scale()))


def note_failure(model: nn.Module, message: str) -> None:
    """Record a window step of ``model`` that raised: the window header carries the count,
    so a step that failed on some ranks only stops every rank at the next window."""
    parallel = strategy(model)
    parallel.failures += 1
    parallel.last_failure = message


def clear_failures(model: nn.Module | None = None) -> None:
    """Forget failed steps (of ``model``; of every model when None): the ranks resumed
    from a checkpoint they agreed on."""
    for parallel in [strategy(model)] if model is not None else list(_CACHE.values()):
        parallel.failures = 0
        parallel.last_failure = ""


def _forward_hook(dp: DataParallel) -> Any:
    ref = weakref.ref(dp)

    def hook(module: nn.Module, args: object, output: object) -> None:
        strategy_ = ref()
        if strategy_ is not None and torch.is_grad_enabled():
            strategy_._armed = bool(getattr(module, "require_forward_param_sync", True))

    return hook


def _buckets(grads: Sequence[torch.Tensor], cap: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same-device, same-dtype gradients of at most ``cap`` bytes."""
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in grads:
        nbytes = grad.numel() * grad.element_size()
        same = not bucket or (grad.dtype, grad.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not same or size + nbytes > cap):
            yield bucket
            bucket, size = [], 0
        bucket.append(grad)
        size += nbytes
    if bucket:
        yield bucket


_CACHE: weakref.WeakKeyDictionary[nn.Module, DataParallel] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref[nn.Module], DataParallel] | None = None
"""The model asked about last and its strategy: most runs train one model."""


def strategy(model: nn.Module, process_group: dist.ProcessGroup | None = None) -> DataParallel:
    """The model's strategy, resolved on first use (or again when ``process_group`` is new)."""
    global _last
    last = _last
    if last is not None and process_group is None and last[0]() is model and model is not None:
        return last[1]
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module (the model whose loss this is, wrapped as you "
            f"train it: DDP, FSDP2, torch.compile), got {type(model).__name__}."
        )
    found = _CACHE.get(model)
    if found is None or (process_group is not None and process_group not in found.groups):
        found = DataParallel(model, process_group)
        _CACHE[model] = found
    _last = (weakref.ref(model), found)
    return found


def prepare(model: nn.Module, process_group: dist.ProcessGroup | None, sync: bool) -> None:
    """Set the sync flag of the model's next forward (``prepare_forward``).

    A plain module has no flag to set, and is not judged here: a wrapper built at the first
    forward (composable ``replicate``) does not exist yet, so its first micro-step judges it.
    """
    unjudged = process_group is None and isinstance(model, nn.Module) and model not in _CACHE
    if unjudged and _steered(_unwrap(model)) is None:
        return
    strategy(model, process_group).set_forward_sync(sync)


def set_forward_sync(model: nn.Module, sync: bool) -> None:
    """Tell DDP whether the backward of the next forward must reduce."""
    strategy(model).set_forward_sync(sync)
