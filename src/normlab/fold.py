"""fold(): merge eval-mode batch norm into the neighbouring conv or linear layer.

In eval mode batch norm is a per-channel affine map y = s·x + t with
s = γ/√(running_var + ε) and t = β − running_mean·s, so it merges into a linear layer:

* **after** a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear (always exact): scale the
  layer's output channels by s (dim 0 of a conv's weight, dim 1 of a transposed conv's,
  within each group) and set its bias to s·b + t (a bias is created when there was none);
* **before** a Conv or Linear (exact only where the layer sees nothing but the affine
  map's output): scale the layer's input channels by s and add W·t to its bias. A conv's
  zero padding would see zeros where the unfolded model sees t, so this needs padding 0
  or a padding mode that copies values (reflect, replicate, circular). A transposed conv
  spreads each input over several outputs, with fewer contributions at the borders, so
  this needs a pointwise one (kernel 1, stride 1, padding 0).

Adjacency comes from a torch.fx trace where the model traces, otherwise from the order
of the children of each nn.Sequential. A norm is folded only when it and the layer are
each called once, and the value between them goes nowhere else. Linear layers are
paired with a batch norm whose channel count matches their features, which assumes
(N, C) data for a channels-first BatchNorm1d next to a Linear.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from normlab.conversion.recognize import is_norm, trusted
from normlab.layers.frozen import FrozenBatchNorm
from normlab.layers.norm_act import NormAct
from normlab.tracing import NormTracer

_LAYERS = (_ConvNd, nn.Linear)


def _foldable_norm(module: nn.Module) -> bool:
    kinds = isinstance(module, (_BatchNorm, FrozenBatchNorm))
    return kinds and trusted(type(module)) and not getattr(module, "per_activation", False)


def _affine(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(s, t) in float64 with norm(x) = s·x + t per channel, or None when it has no fixed map."""
    if norm.running_mean is None or getattr(norm, "channel_axis", 1) != 1:
        return None
    var, mean = norm.running_var.double(), norm.running_mean.double()
    scale = torch.rsqrt(var + norm.eps)
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if weight is not None:
        scale = scale * weight.detach().double()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.detach().double()
    return scale, shift


def _foldable_layer(module: nn.Module) -> bool:
    if not isinstance(module, _LAYERS) or not trusted(type(module)):
        return False
    return not isinstance(module.weight, nn.parameter.UninitializedParameter)


def _channels(layer: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a conv or linear layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _set(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    old = layer.weight
    layer.weight = nn.Parameter(weight.to(old.dtype), requires_grad=old.requires_grad)
    layer.bias = nn.Parameter(bias.to(old.dtype), requires_grad=old.requires_grad)


def _bias(layer: nn.Module, out: int) -> torch.Tensor:
    if layer.bias is None:
        return torch.zeros(out, dtype=torch.float64, device=layer.weight.device)
    return layer.bias.detach().double()


@torch.no_grad()
def _fold_after(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    w = layer.weight.detach().double()
    out = _channels(layer)[1]
    if isinstance(layer, _ConvNd) and layer.transposed:
        g = layer.groups  # weight (in, out/g, *k): output channel gi·(out/g) + j
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))
        w = (grouped * s).reshape(w.shape)
    else:
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    _set(layer, w, _bias(layer, out) * scale + shift)


def _no_padding(conv: _ConvNd) -> bool:
    if conv.padding_mode != "zeros":
        return True  # padded values are copies of the norm's outputs: the map commutes
    if conv.padding == "valid":
        return True
    if conv.padding == "same":
        return all(d * (k - 1) == 0 for d, k in zip(conv.dilation, conv.kernel_size, strict=True))
    return all(p == 0 for p in conv.padding)


def _can_fold_before(layer: nn.Module) -> bool:
    if isinstance(layer, nn.Linear):
        return True
    if layer.transposed:
        pointwise = all(k == 1 for k in layer.kernel_size) and all(s == 1 for s in layer.stride)
        flat = all(p == 0 for p in layer.padding) and all(p == 0 for p in layer.output_padding)
        return pointwise and flat
    return _no_padding(layer)


@torch.no_grad()
def _fold_before(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    w = layer.weight.detach().double()
    out = _channels(layer)[1]
    if isinstance(layer, nn.Linear):
        bias = _bias(layer, out) + w @ shift
        w = w * scale
    elif layer.transposed:  # pointwise: weight (in, out/g, 1, ...), input channel gi·(in/g) + i
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1])
        t = shift.reshape(g, -1)
        bias = _bias(layer, out) + torch.einsum("gio,gi->go", grouped, t).reshape(-1)
        w = w * scale.reshape(-1, *[1] * (w.dim() - 1))
    else:  # weight (out, in/g, *k), input channel gi·(in/g) + i for outputs of group gi
        g = layer.groups
        summed = w.sum(dim=tuple(range(2, w.dim()))).reshape(g, out // g, w.shape[1])
        t = shift.reshape(g, -1)
        bias = _bias(layer, out) + torch.einsum("goi,gi->go", summed, t).reshape(-1)
        s = scale.reshape(g, 1, w.shape[1], *[1] * (w.dim() - 2))
        w = (w.reshape(g, out // g, *w.shape[1:]) * s).reshape(w.shape)
    _set(layer, w, bias)


def _try_fold(norm: nn.Module, after: nn.Module | None, before: nn.Module | None) -> bool:
    """Fold `norm` into the layer it follows (`after`) or, failing that, the one it feeds."""
    affine = _affine(norm)
    if affine is None:
        return False
    channels = len(affine[0])
    if after is not None and _foldable_layer(after) and _channels(after)[1] == channels:
        _fold_after(after, *affine)
        return True
    if before is not None and _foldable_layer(before) and _channels(before)[0] == channels:
        if _can_fold_before(before):
            _fold_before(before, *affine)
            return True
    return False


class _Tracer(NormTracer):
    """Norms, convs and linears (and every normlab layer) stay single calls in the graph."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, NormAct):
            return False  # look inside: its norm may fold into the layer before
        return isinstance(m, _LAYERS) or is_norm(m) or super().is_leaf_module(m, qualname)


def _single_call_module(node: object, module: nn.Module, calls: Counter) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module" and calls[node.target] == 1:
        return module.get_submodule(node.target)
    return None


def _fold_graph(module: nn.Module, graph: fx.Graph, once: set[int]) -> None:
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        norm = _single_call_module(node, module, calls)
        if norm is None or not _foldable_norm(norm) or id(norm) not in once:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        after = _single_call_module(node.args[0], module, calls)
        if after is not None and (len(node.args[0].users) != 1 or id(after) not in once):
            after = None
        before = None
        if len(node.users) == 1:
            user = next(iter(node.users))
            if user.args == (node,) and not user.kwargs:
                before = _single_call_module(user, module, calls)
            if before is not None and id(before) not in once:
                before = None
        if _try_fold(norm, after, before):
            module.set_submodule(node.target, nn.Identity())


def _fold_sequential(seq: nn.Sequential, once: set[int]) -> None:
    names = list(seq._modules)
    for i, name in enumerate(names):
        norm = seq._modules[name]
        if not (_foldable_norm(norm) and id(norm) in once):
            continue
        after = seq._modules[names[i - 1]] if i > 0 else None
        before = seq._modules[names[i + 1]] if i + 1 < len(names) else None
        after = after if after is not None and id(after) in once else None
        before = before if before is not None and id(before) in once else None
        if _try_fold(norm, after, before):
            seq._modules[name] = nn.Identity()


def _fold_tree(module: nn.Module, once: set[int]) -> None:
    try:
        graph = _Tracer().trace(module)
    except Exception:  # not traceable (data-dependent control flow, ...): look inside
        graph = None
    if graph is not None:
        _fold_graph(module, graph, once)
        return
    if isinstance(module, nn.Sequential):
        _fold_sequential(module, once)
    for child in module.children():
        if not _foldable_norm(child) and not isinstance(child, _LAYERS):
            _fold_tree(child, once)


def fold(model: nn.Module) -> nn.Module:
    """A copy of `model` for inference, with every eval-mode batch norm that sits next to
    a conv or linear merged into it (and replaced by nn.Identity).

    Batch norms of any rank count (torch's, normlab's, SyncBatchNorm, FrozenBatchNorm);
    a subclass with its own forward does not. Those that cannot be folded exactly stay.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8)).eval()
        >>> fold(net)
        Sequential(
          (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
          (1): Identity()
        )
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: expected an nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        if (
            _foldable_norm(m)
            and isinstance(m, _BatchNorm)
            and m.training
            and m.running_mean is not None
        ):
            raise ValueError(
                f"fold: expected a model in eval mode (call model.eval() first); "
                f"{name or '<root>'} ({type(m).__name__}) is in training mode, where it "
                f"normalizes with batch statistics and cannot be folded"
            )
    model = copy.deepcopy(model)
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    _fold_tree(model, {key for key, n in counts.items() if n == 1})
    return model
