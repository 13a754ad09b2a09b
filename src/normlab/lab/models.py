"""The laboratory's models: a plain CNN, a small ResNet and a row-by-row RNN.

Every norm layer comes from one place, `norm_layer(name, channels)`, which asks the
registry (`normlab.create_norm`), so any registered name is one command-line flag.
Model-level variants (IBN-Net's "ibn-a", "ibn-b") are made by `normlab.convert` from
the batch-norm model.

Example:
    >>> model = build_model("cnn", "gn", image_shape=(1, 16, 16), num_classes=10)
"""

from __future__ import annotations

import re

import torch
from torch import nn

import normlab
from normlab.lab.norm_layers import norm_layers_in_forward_order
from normlab.lab.weightnorm import WEIGHT_NORMS, apply_weight_norm

# Norms that are a conversion of the whole batch-norm model, not one layer per place.
CONVERTED_NORMS = ("ibn-a", "ibn-b")
MODELS = ("cnn", "resnet", "rnn")
# "gbn8": ghost batch norm over ghost batches of 8; "in-first-3": instance norm in the
# first 3 norm layers of the forward pass, batch norm in the rest.
GHOST_NORM = re.compile(r"gbn(\d+)")
IN_FIRST = re.compile(r"in-first-(\d+)")


def norm_layer(name: str, channels: int) -> nn.Module:
    """One norm layer for `channels` channels from the registry ("none" is the identity;
    "gbn<k>" is ghost batch norm with ghost batches of k)."""
    ghost = GHOST_NORM.fullmatch(name)
    if ghost:
        return normlab.create_norm("gbn", channels, ghost_size=int(ghost[1]))
    return normlab.create_norm(name, channels)


def instance_norm_first(net: nn.Module, k: int, example: torch.Tensor) -> nn.Module:
    """Replace the first `k` norm layers of `net` in forward order (on `example`) by
    instance norm (affine, over each sample's positions) in place; return `net`."""
    layers = norm_layers_in_forward_order(net, example)
    if not 0 <= k <= len(layers):
        raise ValueError(f"in-first-k: expected k in 0..{len(layers)} (the norm layers), got {k}")
    for name, layer in layers[:k]:
        parent_name, _, attr = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, attr, normlab.create_norm("in", layer.num_features))
    return net


def count_norm_layers(model: str, width: int | None = None, depth: int | None = None) -> int:
    """How many norm layers `model` has (what k of "in-first-k" may go up to)."""
    net = build_model(model, "bn", image_shape=(1, 16, 16), num_classes=2, width=width, depth=depth)
    return len(norm_layers_in_forward_order(net, torch.zeros(2, 1, 16, 16)))


def uses_batch_statistics(module: nn.Module) -> bool:
    """True if the module keeps running estimates of batch statistics (BN and kin)."""
    return any(hasattr(m, "running_mean") for m in module.modules())


class PlainCNN(nn.Module):
    """`depth` conv3x3-norm-ReLU layers, channels doubling at each of up to 3 stride-2 steps,
    then global average pooling and a linear classifier.

    With 16x16 inputs and depth 5 the deepest maps are 2x2, so a batch-norm set at
    batch size n holds only 4n values: small batches make its statistics noisy.
    """

    def __init__(
        self,
        norm: str,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        depth: int = 5,
        downsamples: int = 3,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"cnn: expected depth >= 1 and width >= 1, got {depth}, {width}")
        steps = min(downsamples, depth - 1)
        # stride-2 layers spread evenly over layers 1..depth-1, the last one always among them
        strided = (
            {round(1 + i * (depth - 2) / max(steps - 1, 1)) for i in range(steps)}
            if steps
            else set()
        )
        layers: list[nn.Module] = []
        channels = in_channels
        out = width
        for i in range(depth):
            stride = 2 if i in strided else 1
            if stride == 2 and i > 1:
                out *= 2
            layers += [
                nn.Conv2d(channels, out, 3, stride, 1, bias=False),
                norm_layer(norm, out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    """ResNet basic block (torchvision's names: conv1, bn1, conv2, bn2, downsample)."""

    def __init__(self, norm: str, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm_layer(norm, planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class SmallResNet(nn.Module):
    """A torchvision-shaped ResNet for small images: 3x3 stem, layer1..layer4 of
    `blocks` basic blocks each (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2)."""

    def __init__(
        self, norm: str, in_channels: int, num_classes: int, width: int = 16, blocks: int = 1
    ) -> None:
        super().__init__()
        if blocks < 1 or width < 1:
            raise ValueError(f"resnet: expected blocks >= 1 and width >= 1, got {blocks}, {width}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(norm, width)
        self.relu = nn.ReLU(inplace=True)
        inplanes = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            planes = width * 2**stage
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(BasicBlock(norm, inplanes, planes, stride if b == 0 else 1))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*stage_blocks))
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class RowRNN(nn.Module):
    """A tanh RNN that reads an image one row per time step (the layer-norm paper's setting).

    h_t = tanh(N_x(W_x x_t) + N_h(W_h h_{t-1}) + b): the two summed inputs are normalized
    separately at every step. A norm with batch statistics (BN) needs its own statistics
    for every time step (`steps` copies, so it cannot read longer sequences than it was
    built for, and needs a batch at every step); a per-sample norm (LN, RMS) shares one
    layer across all steps.
    """

    def __init__(
        self,
        norm: str,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        steps: int = 16,
        row_size: int = 16,
    ) -> None:
        super().__init__()
        self.input = nn.Linear(in_channels * row_size, width, bias=False)
        self.hidden = nn.Linear(width, width, bias=False)
        self.bias = nn.Parameter(torch.zeros(width))
        probe = norm_layer(norm, width)
        try:  # a hidden state [N, width] has no positions: per-(sample, channel) norms fail
            probe(torch.zeros(2, width))
        except (ValueError, RuntimeError) as error:
            raise ValueError(
                f"rnn: norm {norm!r} cannot normalize a hidden vector [N, {width}] ({error}); "
                "use one over features (ln, rms) or over the batch (bn)"
            ) from error
        self.per_step = uses_batch_statistics(probe)
        copies = steps if self.per_step else 1
        self.norm_x = nn.ModuleList(norm_layer(norm, width) for _ in range(copies))
        self.norm_h = nn.ModuleList(norm_layer(norm, width) for _ in range(copies))
        self.steps = steps
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, w = x.shape
        if self.per_step and height > self.steps:
            raise ValueError(
                f"rnn: per-step batch statistics exist for {self.steps} rows, got {height}"
            )
        rows = x.permute(0, 2, 1, 3).reshape(n, height, c * w)
        h = x.new_zeros(n, self.hidden.in_features)
        for t in range(height):
            k = t if self.per_step else 0
            h = torch.tanh(
                self.norm_x[k](self.input(rows[:, t])) + self.norm_h[k](self.hidden(h)) + self.bias
            )
        return self.fc(h)


def build_model(
    model: str,
    norm: str,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    width: int | None = None,
    depth: int | None = None,
) -> nn.Module:
    """Build `model` ("cnn", "resnet", "rnn") with every norm layer of kind `norm`.

    Besides registry names: "ibn-a", "ibn-b" (converted), "wn", "wn-mobn" (weight norm
    on every conv and linear; see `normlab.lab.weightnorm`), "gbn<k>" (ghost batch
    norm, ghost batches of k) and "in-first-<k>" (instance norm in the first k norm
    layers in forward order, batch norm after).

    `depth` is the number of conv layers (cnn), blocks per stage (resnet); `width` the
    first stage's channels (cnn, resnet) or the hidden size (rnn).
    """
    if model not in MODELS:
        raise ValueError(f"model: expected one of {', '.join(MODELS)}, got {model!r}")
    in_channels, height, row = image_shape
    in_first = IN_FIRST.fullmatch(norm)
    layer_norm = "bn" if norm in CONVERTED_NORMS or in_first else WEIGHT_NORMS.get(norm, norm)
    if model == "cnn":
        net: nn.Module = PlainCNN(layer_norm, in_channels, num_classes, width or 16, depth or 5)
    elif model == "resnet":
        net = SmallResNet(layer_norm, in_channels, num_classes, width or 16, depth or 1)
    else:
        net = RowRNN(layer_norm, in_channels, num_classes, width or 64, height, row)
    if norm in CONVERTED_NORMS and model == "rnn":
        raise ValueError(
            f"rnn: {norm!r} converts a convolutional ResNet; use it with cnn or resnet"
        )
    if norm in CONVERTED_NORMS:
        convert = getattr(normlab, "convert", None)
        if convert is None:
            raise ValueError(f"norm {norm!r} needs normlab.convert, which this install lacks")
        net, _ = convert(net, to=norm)
    if norm in WEIGHT_NORMS:
        apply_weight_norm(net, conv_bias=layer_norm == "none")
    if in_first:
        if model == "rnn":
            raise ValueError(f"rnn: {norm!r} needs conv layers (instance norm); use cnn or resnet")
        instance_norm_first(net, int(in_first[1]), torch.zeros(2, *image_shape))
    return net
