"""IBN-Net (Pan et al. 2018): instance norm on some channels, batch norm on the rest.

IBN-a (:class:`IBN`) normalizes the first ``int(planes·ratio)`` channels with an affine
instance norm (no running statistics) and the remaining channels with batch norm; the
submodules are named ``IN`` and ``BN`` so checkpoints of the official release load
(``IN.weight``, ``BN.running_mean``, ...). While both are the plain layers built here,
one statistics pass and one normalizing pass serve both halves (no split, no
concatenation). The channels are split by explicit sizes, so odd ``planes`` and any
ratio in (0, 1) work (the release's chunked split does not).
With ``sync=True`` the ``BN`` half is a :class:`~normlab.SyncBatchNorm` over
``process_group`` (None: the default group); the IN half is per sample.

IBN-b (:class:`IBNb`) is an affine instance norm over all channels placed *after* a
residual addition and before the block's final ReLU; ``IBNb(c)(out, identity)`` adds
then normalizes.
"""

from __future__ import annotations

import torch
from torch import nn

from normlab.distributed import check_sync, synchronizing
from normlab.kernels.dispatch import serves_derived
from normlab.kernels.transforms import fx_leaf, transform
from normlab.layers import routes
from normlab.layers.batchnorm import BatchNorm
from normlab.layers.checks import (
    channel_view,
    check_channel_axis,
    check_eps_momentum,
    check_input,
    check_positive_int,
    check_unit_interval,
    describe,
)
from normlab.layers.instancenorm import InstanceNorm
from normlab.layers.syncbatchnorm import SYNC_BATCH_NORMS, SyncBatchNorm
from normlab.moments import Moments, from_stats
from normlab.normalize import normalize_derived
from normlab.pattern import Plan, plan


def ibn_split(planes: int, ratio: float) -> tuple[int, int]:
    """Channels for (instance norm, batch norm): ``int(planes·ratio)`` and the rest."""
    planes = check_positive_int(planes, "IBN", "planes")
    check_unit_interval(ratio, "IBN", "ratio")
    half = int(planes * ratio)
    if not 0 < half < planes:
        raise ValueError(
            f"IBN: planes={planes} with ratio={ratio} gives {half} instance-norm channels; "
            f"expected between 1 and {planes - 1} (more planes or another ratio)"
        )
    return half, planes - half


class IBN(routes.Routed, nn.Module):
    """IBN-a layer: ``IN`` (affine instance norm) on the first channels, ``BN`` on the rest.

    Example:
        >>> m = IBN(64)  # 32 channels of instance norm, 32 of batch norm
        >>> m(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64, 7, 7])
        >>> sorted(m.state_dict())[:2]
        ['BN.bias', 'BN.num_batches_tracked']
    """

    def __init__(
        self,
        planes: int,
        ratio: float = 0.5,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        channel_axis: int = 1,
        sync: bool = False,
        process_group: object = None,
    ) -> None:
        super().__init__()
        check_eps_momentum(eps, momentum, "IBN", positive=True)
        self.instance_channels, rest = ibn_split(planes, ratio)
        self.planes, self.ratio = planes, ratio
        self.channel_axis = check_channel_axis(channel_axis)
        self.IN = InstanceNorm(
            self.instance_channels, eps=eps, affine=True, channel_axis=channel_axis
        )
        options = {"eps": eps, "momentum": momentum, "channel_axis": channel_axis}
        if check_sync(sync, process_group, "IBN"):
            self.BN = SyncBatchNorm(rest, process_group=process_group, **options)
        else:
            self.BN = BatchNorm(rest, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return routes.forward(self, x, IBN._full_forward, self._route)

    def _route(self, x: torch.Tensor) -> routes.Route | None:
        """The split path (whose halves have routes of their own), where the full path
        takes it; not a synchronized BN half (its statistics are the group's)."""
        p = self._plan(x)
        if self.sync or not self._splits(x, p):
            return None
        whole = self._one_pass(x, p)
        return lambda m, x: m._split(x, whole)

    def _plan(self, x: torch.Tensor) -> Plan:
        return plan("n c ... -> n c" if self.channel_axis == 1 else "n ... c -> n c", x.shape)

    def _splits(self, x: torch.Tensor, p: Plan) -> bool:
        """Whether the halves are normalized apart (split, two layers, concatenate) rather
        than in one pass: when one pass cannot serve both; in eager below the kernels'
        size floor (two ATen kernels beat the one-pass reference path's many small ops);
        under torch.compile (Inductor's code for the halves' ATen kernels measured
        faster than for the one-pass decomposition, see docs/performance.md)."""
        if x.numel() == 0 or not self._one_pass(x, p):
            return True
        mode = transform(x)
        if mode == "compile":
            return True
        # float32/64 only: ATen's half-precision instance norm loses digits far from zero
        full = x.dtype in (torch.float32, torch.float64)
        return mode == "eager" and full and not serves_derived(x, p)

    def _split(self, x: torch.Tensor, whole: bool) -> torch.Tensor:
        """IN on the first channels, BN on the rest, concatenated; `whole`: both halves
        are the plain layers and the input valid for both (see :meth:`_one_pass`)."""
        axis = self.channel_axis % x.dim()
        first, rest = torch.split(
            x, [self.instance_channels, self.planes - self.instance_channels], dim=axis
        )
        if transform(x) == "eager":  # dense halves: the layers' ATen kernels take them
            first, rest = _dense_like(first, x), _dense_like(rest, x)
        IN = self.IN  # noqa: N806
        if whole and axis == 1 and x.is_contiguous():  # its output is contiguous
            # the release's instance norm (ATen's, batch norm over an (1, N·C, ...) view):
            # unlike group norm's kernel it stays finite when x² overflows (|x| ~ 1e30)
            first = torch.instance_norm(
                first, IN.weight, IN.bias, None, None, True, 0.0, IN.eps, False
            )
        else:
            first = IN(first)
        return torch.cat([first, self.BN(rest)], dim=axis)

    @fx_leaf
    def _full_forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.channel_axis % max(x.dim(), 1)
        check_input(self, x, None, self.planes, axis)
        if x.dim() < 3:
            raise ValueError(
                f"{describe(self)}: expected input of at least 3 dims (N, C, positions...), "
                f"got shape {tuple(x.shape)}"
            )
        p = self._plan(x)
        if self._splits(x, p):  # each half handles an empty batch
            return self._split(x, x.numel() > 0 and self._one_pass(x, p))
        half, bn = self.instance_channels, self.BN
        use_batch = bn._uses_batch_stats()
        tracked: list[Moments] = []  # the BN half's batch moments, for its buffers

        def derive(mean, var):  # noqa: ANN001, ANN202
            # IN's statistics for the first channels, BN's (from the same instance
            # moments, by Chan's formula) for the rest
            inst = from_stats(mean, var, p)
            if use_batch:
                rest = Moments(*(t[:, half:] for t in (inst.mean, inst.var, inst.count)), inst.axes)
                batch = rest.reduce("n")
                tracked.append(batch)
                bn_mean, bn_var = batch.mean, batch.var
            else:
                bn_mean, bn_var = bn.running_mean, bn.running_var
            n = inst.mean.shape[0]
            m = torch.cat([inst.mean[:, :half], bn_mean.expand(n, -1).to(inst.mean.dtype)], 1)
            r_in = torch.rsqrt(inst.var[:, :half] + self.IN.eps)
            r_bn = torch.rsqrt(bn_var + bn.eps).expand(n, -1).to(r_in.dtype)
            return p.to_stats(m), p.to_stats(torch.cat([r_in, r_bn], 1))

        weight = channel_view(torch.cat([self.IN.weight, bn.weight]), x.dim(), axis)
        bias = channel_view(torch.cat([self.IN.bias, bn.bias]), x.dim(), axis)
        y, _ = normalize_derived(x, p, derive, weight, bias)
        if tracked and bn.training and bn.track_running_stats:
            bn._update_running(tracked[0].mean.detach(), tracked[0].unbiased_var().detach())
        return y

    def reset_parameters(self) -> None:
        """Both halves to their initial state (γ = 1, β = 0, fresh running statistics)."""
        self.IN.reset_parameters()
        self.BN.reset_parameters()

    def _one_pass(self, x: torch.Tensor, p: Plan) -> bool:
        """Whether both halves are the plain layers built here (not converted or frozen
        since; synchronized only when not synchronizing now) and the input is valid for
        both: then one pass serves them."""
        IN, BN = self.IN, self.BN  # noqa: N806
        return (
            type(IN) is InstanceNorm
            and (type(BN) is BatchNorm or (type(BN) is SyncBatchNorm and not synchronizing(BN)))
            and IN.affine
            and not IN.track_running_stats
            and BN.affine
            and BN.bias is not None
            and IN.bias is not None
            and IN.channel_axis == BN.channel_axis
            and IN.weight.dtype == BN.weight.dtype
            and p.set_size > 1
        )

    @property
    def sync(self) -> bool:
        """Whether the BN half is synchronized (also after ``convert_sync_batchnorm``)."""
        return isinstance(self.BN, SYNC_BATCH_NORMS)

    def extra_repr(self) -> str:
        text = f"{self.planes}, ratio={self.ratio}"
        text += f", channel_axis={self.channel_axis}" if self.channel_axis != 1 else ""
        return text + (", sync=True" if self.sync else "")


def _dense_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`t` (a slice of `x`) dense, in `x`'s memory format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


class IBNb(InstanceNorm):
    """IBN-b's instance norm: affine, over all channels, after the residual addition.

    In the release's ResNet the block's forward becomes ``relu(IN(out + identity))``;
    registered as the block's ``IN`` attribute, its keys are ``IN.weight``/``IN.bias``.
    ``forward(x, residual)`` adds ``residual`` first (pass ``residual=None`` to skip).

    Example:
        >>> IBNb(256)(torch.randn(2, 256, 7, 7), torch.randn(2, 256, 7, 7)).shape
        torch.Size([2, 256, 7, 7])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        channel_axis: int = 1,
    ) -> None:
        num_features = check_positive_int(num_features, "IBNb")
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            channel_axis=channel_axis,
        )

    @fx_leaf
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
                got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else residual
                raise ValueError(
                    f"{describe(self)}: expected a residual of shape {tuple(x.shape)}, got {got!r}"
                )
            x = x + residual
        return super().forward(x)
