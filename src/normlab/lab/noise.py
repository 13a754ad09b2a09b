"""Batch noise: how much a sample's output depends on the other samples of its batch.

A model trained at batch size B is run in training mode (statistics from the batch;
running buffers left as they were). Each of P fixed probe images is put into K batches
of size B whose other B − 1 images ("companions") are drawn at random from the
training set, and the probe's output is read each time. Then

    batch_noise = mean over probes of std over companions (of each logit)
                  / std over probes (of each logit, averaged over companions)

both averaged over the logits, standard deviations with n in the denominator. A norm
with no batch statistics (LN, GN, IN, weight norm) gives 0 up to rounding; batch norm
gives a number that shrinks as B grows. The same ratio on each norm layer's output
(its features for the probe, flattened; all calls of a layer shared across time
steps) says where in the network the noise enters.

Example:
    >>> idx = draw_companions(1000, probes=64, companions=16, batch_size=8, seed=0)
    >>> result = measure_batch_noise(model, x_test[:64], x_train, idx)  # doctest: +SKIP
    >>> # or read the companions from a Dataset, one probe's K·(B − 1) images at a time:
    >>> result = measure_batch_noise(model, x_test[:64], fetch_train, idx)  # doctest: +SKIP
    >>> result.batch_noise  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normlab.lab.norm_layers import norm_layers

DEFAULT_PROBES = 64
DEFAULT_COMPANIONS = 16


@dataclass(frozen=True)
class BatchNoise:
    """The batch-noise ratio of a model's logits and of each norm layer's output."""

    batch_noise: float
    layers: dict[str, float]


def noise_ratio(outputs: torch.Tensor) -> float:
    """`outputs` [P, K, F] (probe, companion batch, feature) -> the batch-noise ratio.

    Example:
        >>> noise_ratio(torch.randn(4, 1, 3).expand(4, 5, 3))  # the same output in every batch
        0.0
    """
    if outputs.dim() != 3 or min(outputs.shape[:2]) < 1:
        raise ValueError(
            f"noise_ratio: expected outputs [probes, companions, features], got {tuple(outputs.shape)}"
        )
    o = outputs.double()
    within = o.std(dim=1, correction=0).mean()
    across = o.mean(dim=1).std(dim=0, correction=0).mean()
    if within == 0:
        return 0.0  # no dependence on the companions (even where probes agree too)
    return float(within / across) if across > 0 else float("nan")


def draw_companions(
    pool_size: int, *, probes: int, companions: int, batch_size: int, seed: int = 0
) -> torch.Tensor:
    """[probes, companions, batch_size − 1] indices into a pool of `pool_size` images:
    every row distinct images, drawn with a generator seeded by `seed`."""
    if batch_size < 1 or batch_size - 1 > pool_size or probes < 1 or companions < 1:
        raise ValueError(
            f"draw_companions: expected probes >= 1, companions >= 1 and 1 <= batch_size <= "
            f"{pool_size + 1} (the pool plus the probe), got probes={probes}, "
            f"companions={companions}, batch_size={batch_size}"
        )
    generator = torch.Generator().manual_seed(seed)
    rows = [
        torch.randperm(pool_size, generator=generator)[: batch_size - 1]
        for _ in range(probes * companions)
    ]
    return torch.stack(rows).reshape(probes, companions, batch_size - 1)


@torch.no_grad()
def measure_batch_noise(
    model: nn.Module,
    probes: torch.Tensor,
    pool: torch.Tensor | Callable[[list[int]], torch.Tensor],
    companions: torch.Tensor,
    layers: dict[str, nn.Module] | None = None,
) -> BatchNoise:
    """Run each probe ``probes[p]`` in the batches ``[probe, *pool[companions[p, k]]]`` in
    training mode and return the batch-noise ratios of the logits and of `layers`
    (default: the model's norm layers). Buffers and the train/eval mode are restored.
    `pool`: the images as a tensor, or a function from a list of indices to those images
    (called once per probe, with its K·(B − 1) companions' indices).
    """
    if companions.dim() != 3 or companions.shape[0] != len(probes):
        raise ValueError(
            f"measure_batch_noise: expected companions [{len(probes)}, K, B - 1] for "
            f"{len(probes)} probes, got {tuple(companions.shape)}"
        )
    layers = norm_layers(model) if layers is None else layers
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, _n=name: captured[_n].append(out[0].flatten().double())
        )
        for name, module in layers.items()
    ]
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    was_training = model.training
    logits: list[torch.Tensor] = []
    features: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    try:
        model.train()
        for p in range(len(probes)):
            per_batch = []
            per_layer: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
            if isinstance(pool, torch.Tensor):
                rows = [pool[companions[p, k]] for k in range(companions.shape[1])]
            elif companions.shape[2] == 0:  # batch size 1: the probe alone
                rows = [probes[:0]] * companions.shape[1]
            else:
                taken = pool(companions[p].flatten().tolist())
                rows = list(taken.split(companions.shape[2]))
            for row in rows:
                batch = torch.cat([probes[p : p + 1], row.to(probes.device)])
                per_batch.append(model(batch)[0].double())
                for name in layers:
                    per_layer[name].append(torch.cat(captured[name]))
                    captured[name].clear()
            logits.append(torch.stack(per_batch))
            for name in layers:
                features[name].append(torch.stack(per_layer[name]))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return BatchNoise(
        noise_ratio(torch.stack(logits)),
        {name: noise_ratio(torch.stack(f)) for name, f in features.items() if f},
    )


def noise_record(
    model: nn.Module,
    test: Callable[[list[int]], torch.Tensor],
    train: Callable[[list[int]], torch.Tensor],
    *,
    test_size: int,
    train_size: int,
    batch_size: int,
    probes: int = DEFAULT_PROBES,
    companions: int = DEFAULT_COMPANIONS,
    seed: int = 0,
) -> dict:
    """The fields a run's record gets: ``batch_noise``, ``batch_noise_layers`` (per norm
    layer), ``noise_probes``, ``noise_companions``. `test`, `train`: functions from a list
    of indices to those images of the test and training sets (`test_size`, `train_size`
    images). Probes: the first test images; companions drawn by :func:`draw_companions`
    with `seed`, read one probe's worth at a time."""
    probes = min(probes, test_size)
    idx = draw_companions(
        train_size, probes=probes, companions=companions, batch_size=batch_size, seed=seed
    )
    result = measure_batch_noise(model, test(list(range(probes))), train, idx)
    return {
        "batch_noise": result.batch_noise,
        "batch_noise_layers": result.layers,
        "noise_probes": probes,
        "noise_companions": companions,
    }
