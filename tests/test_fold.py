"""fold(): eval-mode batch norm merged into the neighbouring conv/linear; the folded model
must compute what the original computes (float64, so the check is sharp)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_convert import randomize_norms, resnet50_like
from torch import nn

import normlab
from normlab import fold

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Untraceable(nn.Module):
    """Identity with data-dependent control flow: torch.fx cannot trace through it."""

    def forward(self, x):
        return x if bool(x.abs().sum() >= 0) else -x


def _norm(draw, rank, channels):
    kind = draw(st.sampled_from(["torch", "normlab", "frozen", "noaffine"]))
    if kind == "torch":
        return TORCH_BN[rank](channels)
    if kind == "normlab":
        return normlab.BatchNorm(channels)
    if kind == "frozen":
        return normlab.FrozenBatchNorm(channels)
    return TORCH_BN[rank](channels, affine=False)


@st.composite
def stacks(draw):
    rank = draw(st.integers(1, 3))
    size = draw(st.integers(4, 7)) if rank == 3 else draw(st.integers(5, 9))
    channels = draw(st.sampled_from([2, 4, 6]))
    first, start = channels, size
    layers = []
    for _ in range(draw(st.integers(2, 6))):
        step = draw(st.sampled_from(["conv", "convt", "bn", "bn", "relu"]))
        if step == "bn":
            layers.append(_norm(draw, rank, channels))
        elif step == "relu":
            layers.append(nn.ReLU())
        else:
            out = draw(st.sampled_from([2, 4, 6]))
            groups = draw(
                st.sampled_from([g for g in (1, 2) if channels % g == 0 and out % g == 0])
            )
            kernel = draw(st.integers(1, 3))
            stride = draw(st.integers(1, 2))
            bias = draw(st.booleans())
            if step == "conv":
                padding = draw(st.integers(0, 1))
                mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
                new = (size + 2 * padding - kernel) // stride + 1
                if new < 2 or kernel > size:
                    continue
                layers.append(
                    CONV[rank](channels, out, kernel, stride, padding, 1, groups, bias, mode)
                )
            else:
                padding = draw(st.integers(0, (kernel - 1) // 2))
                new = (size - 1) * stride - 2 * padding + kernel
                if new > 12:
                    continue
                layers.append(CONVT[rank](channels, out, kernel, stride, padding, 0, groups, bias))
            size, channels = new, out
    return rank, first, start, layers


def _check(model, x):
    original = copy.deepcopy(model)
    folded = fold(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    for a, b in zip(original.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the model given is left as it was
    return folded


@settings(max_examples=60, deadline=None)
@given(stacks(), st.booleans(), st.integers(0, 2**16))
def test_random_stacks_compute_the_same(stack, traceable, seed):
    rank, channels, size, layers = stack
    torch.manual_seed(seed)
    head = [] if traceable else [Untraceable()]  # force the nn.Sequential path
    model = randomize_norms(nn.Sequential(*head, *layers), seed).double().eval()
    x = torch.randn(2, channels, *[size] * rank, dtype=torch.float64)
    folded = _check(model, x)
    offset = len(head)
    for i, layer in enumerate(layers):
        if i > 0 and isinstance(layers[i - 1], nn.modules.conv._ConvNd):
            if isinstance(layer, nn.modules.batchnorm._BatchNorm | normlab.FrozenBatchNorm):
                assert isinstance(folded[offset + i], nn.Identity), (i, folded)


def test_fold_after_conv_and_linear_with_and_without_bias():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        normlab.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 25, 10, bias=False),
        nn.BatchNorm1d(10),
    )
    model = randomize_norms(model).double().eval()
    folded = _check(model, torch.randn(4, 3, 5, 5, dtype=torch.float64))
    assert [i for i, m in enumerate(folded) if isinstance(m, nn.Identity)] == [1, 4, 7]
    assert folded[0].bias is not None and folded[6].bias is not None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())


def test_fold_before_needs_no_zero_padding():
    torch.manual_seed(0)
    model = (
        randomize_norms(
            nn.Sequential(
                nn.BatchNorm2d(4),
                nn.Conv2d(4, 6, 3, padding=1),  # zero padding: cannot take the norm in
                nn.ReLU(),
                nn.BatchNorm2d(6),
                nn.Conv2d(6, 6, 3, padding=1, padding_mode="replicate", groups=3),  # can
                nn.ReLU(),
                nn.BatchNorm2d(6),
                nn.Conv2d(6, 2, 2, stride=2),  # no padding: can
                nn.ReLU(),
                nn.BatchNorm2d(2),
                nn.ConvTranspose2d(2, 4, 1, groups=2),  # pointwise transposed conv: can
                nn.ReLU(),
                nn.BatchNorm2d(4),
                nn.ConvTranspose2d(4, 4, 2, stride=2),  # spreads inputs: cannot
            )
        )
        .double()
        .eval()
    )
    folded = _check(model, torch.randn(2, 4, 8, 8, dtype=torch.float64))
    kept = [i for i, m in enumerate(folded) if isinstance(m, nn.BatchNorm2d)]
    assert kept == [0, 12]


def test_linear_before_and_transposed_3d():
    torch.manual_seed(0)
    mlp = (
        randomize_norms(
            nn.Sequential(
                nn.BatchNorm1d(5), nn.Linear(5, 3), nn.ReLU(), nn.BatchNorm1d(3), nn.Linear(3, 2)
            )
        )
        .double()
        .eval()
    )
    folded = _check(mlp, torch.randn(7, 5, dtype=torch.float64))
    assert isinstance(folded[0], nn.Identity) and isinstance(folded[3], nn.Identity)
    deconv = (
        randomize_norms(
            nn.Sequential(
                nn.ConvTranspose3d(4, 6, 3, stride=2, groups=2, bias=False), nn.BatchNorm3d(6)
            )
        )
        .double()
        .eval()
    )
    assert isinstance(
        _check(deconv, torch.randn(2, 4, 3, 3, 3, dtype=torch.float64))[1], nn.Identity
    )


class Residual(nn.Module):
    """Traceable but not a Sequential: fan-out decides what may fold."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)  # conv1's output also feeds the sum: must not fold into it
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)
        self.shared = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)  # after a conv that is called twice: must not fold

    def forward(self, x):
        a = self.conv1(x)
        b = self.bn2(self.conv2(self.bn1(a)))
        c = self.shared(self.shared(a + b))
        return self.bn3(c)


def test_graph_path_respects_fan_out_and_shared_layers():
    torch.manual_seed(0)
    model = randomize_norms(Residual()).double().eval()
    folded = _check(model, torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert isinstance(folded.bn1, nn.Identity)  # folded forward into conv2 (1x1, no padding)
    assert isinstance(folded.bn2, nn.Identity)
    assert isinstance(folded.bn3, nn.BatchNorm2d)
    torch.testing.assert_close(folded.conv1.weight, model.conv1.weight)


def test_resnet_folds_every_batch_norm():
    model = resnet50_like(width=8).double().eval()
    folded = _check(model, torch.randn(2, 3, 32, 32, dtype=torch.float64))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_sync_and_frozen_and_subclass():
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = (
        randomize_norms(
            nn.Sequential(
                nn.Conv2d(3, 4, 1),
                normlab.SyncBatchNorm(4),
                nn.Conv2d(4, 4, 1),
                normlab.FrozenBatchNorm(4),
                nn.Conv2d(4, 4, 1),
                Scaled(4),
            )  # fmt: skip
        )
        .double()
        .eval()
    )
    folded = _check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert [type(m).__name__ for m in folded][1::2] == ["Identity", "Identity", "Scaled"]


def test_norm_act_inner_batch_norm_folds():
    model = (
        randomize_norms(nn.Sequential(nn.Conv2d(3, 4, 1), normlab.norm_act("bn", 4, act="relu")))
        .double()
        .eval()
    )
    folded = _check(model, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert isinstance(folded[1].norm, nn.Identity) and isinstance(folded[1].act, nn.ReLU)


def test_batch_norm_without_running_stats_stays():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    folded = _check(model, torch.randn(3, 3, 4, 4))
    assert isinstance(folded[1], nn.BatchNorm2d)


def test_errors():
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fold([nn.Conv2d(3, 4, 1)])
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"eval mode.*1 \(BatchNorm2d\) is in training mode"):
        fold(model)
