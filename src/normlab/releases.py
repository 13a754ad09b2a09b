"""The hybrid norms as their official releases compute them, in plain torch: bench baselines.

`normlab bench` times normlab's hybrid layers against what a user of the official
release runs. Each class here writes one release's published formulation with
torch.nn and torch ops only (NCHW input, training and eval), and
:func:`release_of` builds it from a normlab layer, copying that layer's parameter
values and running buffers so that the two compute the same function. Being
written from the formulations and not from normlab's engine, they also serve the
tests as independent oracles of the layers.

* IBN-a: split the channels, ``InstanceNorm2d(half, affine=True)`` on the first
  part, ``BatchNorm2d`` on the rest, concatenate.
* Batch-Instance: ``F.batch_norm`` with the running buffers and ``F.instance_norm``,
  mixed by the gate ρ, then the affine.
* SwitchNorm2d: instance moments over a (N, C, H·W) view, LN and BN moments derived
  from them, softmax-weighted mixtures; the moving average weighs the *old* value.

Example:
    >>> layer = normlab.SwitchableNorm(64)
    >>> release = release_of(layer)  # a ReleaseSwitchNorm2d with the layer's values
    >>> torch.allclose(release(x), layer(x), atol=1e-5)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_nchw(who: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected (N, C, H, W) input as the release, got {got}")


def _channel(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1, 1, 1)


class ReleaseIBN(nn.Module):
    """IBN-a as released: affine ``InstanceNorm2d`` on the first ``half`` channels, BN on the rest.

    The release splits with a chunk size (``torch.split(x, half, 1)``); explicit sizes
    give the same two parts for its configurations and also work for odd ``planes``.

    Example:
        >>> ReleaseIBN(64, 32)(torch.randn(8, 64, 7, 7)).shape
        torch.Size([8, 64, 7, 7])
    """

    def __init__(self, planes: int, half: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if not 0 < half < planes:
            raise ValueError(f"ReleaseIBN: expected 0 < half < planes={planes}, got half={half}")
        self.planes, self.half = planes, half
        self.IN = nn.InstanceNorm2d(half, eps=eps, affine=True)
        self.BN = nn.BatchNorm2d(planes - half, eps=eps, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw("ReleaseIBN", x)
        first, rest = torch.split(x, [self.half, self.planes - self.half], 1)
        return torch.cat((self.IN(first), self.BN(rest)), 1)


class ReleaseBatchInstanceNorm(nn.Module):
    """Batch-Instance norm as released: ``(ρ·BN(x) + (1 − ρ)·IN(x))·γ + β``.

    BN uses the batch's statistics in training (updating the running buffers,
    ``momentum`` the weight of the new batch) and the buffers in eval; IN always
    uses the instance's own. ρ (``gate``) is used as is: the release clamps it to
    [0, 1] after each optimizer step, not in forward.

    Example:
        >>> ReleaseBatchInstanceNorm(16)(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.gate = nn.Parameter(torch.ones(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw("ReleaseBatchInstanceNorm", x)
        bn = F.batch_norm(
            x, self.running_mean, self.running_var, None, None, self.training,
            self.momentum, self.eps,
        )  # fmt: skip
        inst = F.instance_norm(x, eps=self.eps)
        rho = _channel(self.gate)
        out = rho * bn + (1 - rho) * inst
        return out * _channel(self.weight) + _channel(self.bias)


class ReleaseSwitchNorm2d(nn.Module):
    """SwitchNorm2d as released (moving average): IN, LN, BN moments mixed by two softmaxes.

    The LN and BN moments are derived from the instance ones, whose variance is the
    *unbiased* one; ``momentum`` weighs the old running value (0.9). γ, β have shape
    (1, C, 1, 1), the buffers (1, C, 1). The release views x as (N, C, H·W), which
    fails on channels-last data; this reshapes (a copy there), as a user must.

    Example:
        >>> ReleaseSwitchNorm2d(16)(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9) -> None:
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))  # order [in, ln, bn]
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_nchw("ReleaseSwitchNorm2d", x)
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        mean_in = flat.mean(-1, keepdim=True)
        var_in = flat.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        second = var_in + mean_in**2  # E[x²] per instance (with the unbiased variance)
        var_ln = second.mean(1, keepdim=True) - mean_ln**2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = second.mean(0, keepdim=True) - mean_bn**2
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        w_mean = torch.softmax(self.mean_weight, 0)
        w_var = torch.softmax(self.var_weight, 0)
        mean = w_mean[0] * mean_in + w_mean[1] * mean_ln + w_mean[2] * mean_bn
        var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
        out = (flat - mean) / (var + self.eps).sqrt()
        return out.reshape(x.shape) * self.weight + self.bias


def release_of(layer: nn.Module) -> nn.Module:
    """The release's composition computing what `layer` (IBN, BatchInstanceNorm, SwitchableNorm) does.

    Copies the layer's parameters and running buffers (values, not the tensors);
    the layer must use channel axis 1, a float momentum and, for SwitchableNorm,
    ``using_bn=True`` and ``variance="release"``.

    Example:
        >>> type(release_of(normlab.IBN(64))).__name__
        'ReleaseIBN'
    """
    from normlab.layers import IBN, BatchInstanceNorm, SwitchableNorm

    if not isinstance(layer, (IBN, BatchInstanceNorm, SwitchableNorm)):
        raise TypeError(
            "release_of: expected a normlab IBN, BatchInstanceNorm or SwitchableNorm, "
            f"got {type(layer).__name__}"
        )
    who = type(layer).__name__
    if layer.channel_axis != 1:
        raise ValueError(f"release_of: the releases are NCHW; expected a {who} with "
                         f"channel_axis=1, got {layer.channel_axis}")  # fmt: skip
    bn = layer.BN if isinstance(layer, IBN) else layer
    if not isinstance(bn.momentum, (int, float)):
        raise ValueError(f"release_of: expected a {who} with a float momentum, got {bn.momentum!r}")
    if isinstance(layer, BatchInstanceNorm) and not (layer.affine and layer.track_running_stats):
        raise ValueError(
            "release_of: the release's Batch-Instance norm is affine with running statistics; "
            f"got affine={layer.affine}, track_running_stats={layer.track_running_stats}"
        )
    if isinstance(layer, SwitchableNorm) and (not layer.using_bn or layer.variance != "release"):
        raise ValueError(
            "release_of: the release's SwitchNorm2d is using_bn=True, variance='release'; "
            f"got using_bn={layer.using_bn}, variance={layer.variance!r}"
        )
    if isinstance(layer, IBN):
        release = ReleaseIBN(layer.planes, layer.instance_channels, layer.BN.eps, layer.BN.momentum)
        values = {f"IN.{k}": getattr(layer.IN, k) for k in ("weight", "bias")}
        values |= {f"BN.{k}": v for k, v in layer.BN.state_dict().items()}
    elif isinstance(layer, BatchInstanceNorm):
        release = ReleaseBatchInstanceNorm(layer.num_features, layer.eps, layer.momentum)
        names = ("weight", "bias", "gate", "running_mean", "running_var")
        values = {k: getattr(layer, k) for k in names}
    else:
        release = ReleaseSwitchNorm2d(layer.num_features, layer.eps, 1.0 - layer.momentum)
        names = ("weight", "bias", "mean_weight", "var_weight", "running_mean", "running_var")
        values = {k: getattr(layer, k) for k in names}
    state = release.state_dict()
    with torch.no_grad():
        for key, value in values.items():
            state[key].copy_(value.detach().reshape(state[key].shape))
    release.to(next(layer.parameters()).dtype)
    return release.train(layer.training)
