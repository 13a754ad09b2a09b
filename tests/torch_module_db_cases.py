"""PyTorch's own module tests (``common_modules.module_db``) run against normlab's drop-in layers.

Not collected with the other tests: importing torch's test utilities changes global state
(``torch.backends`` flags, the hypothesis profile, TorchScript's call hooks), so
``test_module_db.py`` runs this file in its own pytest process.

For every drop-in layer's ModuleInfo, every sample input in training and in eval, in
float32 and float64, on the forced Numba path (fixture ``numba_kernels``) and on the
plain path (``use_reference``): the normlab layer, built with the same arguments and
holding the torch layer's state, must give torch's output, input and parameter
gradients and running buffers (twice in a row, so the second step starts from updated
buffers); in float64, gradcheck and gradgradcheck must pass. Every error input must
raise the same exception type, no later than torch (at construction where torch raises
in forward). Deliberate differences from torch.nn are listed in ``DIFFERENCES`` with their
reason, and in the docs.
"""

import contextlib
import copy

import pytest
import torch
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

import normlab
from normlab.kernels import use_reference

DROP_INS = {
    torch.nn.BatchNorm1d: normlab.BatchNorm1d,
    torch.nn.BatchNorm2d: normlab.BatchNorm2d,
    torch.nn.BatchNorm3d: normlab.BatchNorm3d,
    torch.nn.InstanceNorm1d: normlab.InstanceNorm1d,
    torch.nn.InstanceNorm2d: normlab.InstanceNorm2d,
    torch.nn.InstanceNorm3d: normlab.InstanceNorm3d,
    torch.nn.LayerNorm: normlab.LayerNorm,
    torch.nn.GroupNorm: normlab.GroupNorm,
    torch.nn.RMSNorm: normlab.RMSNorm,
}

# (torch class name, sample desc or error regex) -> reason. Each is documented in
# docs/concepts.md, "Deliberate differences from torch.nn".
DIFFERENCES = {
    ("InstanceNorm1d", "num_batches_tracked"): (
        "normlab's instance norms with track_running_stats count their batches in "
        "num_batches_tracked (so momentum=None is a cumulative average); torch's never do"
    ),
}
for _name in ("InstanceNorm2d", "InstanceNorm3d"):
    DIFFERENCES[(_name, "num_batches_tracked")] = DIFFERENCES[
        ("InstanceNorm1d", "num_batches_tracked")
    ]

INFOS = [info for info in module_db if info.module_cls in DROP_INS]
DTYPES = [torch.float32, torch.float64]
TOLERANCE = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float64: {}}


def _samples(info, dtype, training):
    return info.module_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=True, training=training
    )


def _cases():
    for info in INFOS:
        for dtype in DTYPES:
            for training in (True, False):
                for i, sample in enumerate(_samples(info, dtype, training)):
                    name = f"{info.module_cls.__name__}-{sample.desc or i}-{dtype}-"
                    name += "train" if training else "eval"
                    yield pytest.param(info, dtype, training, i, id=name)


@pytest.fixture(params=["numba", "reference"])
def path(request):
    """The forced Numba path (the shared fixture) or the plain path."""
    if request.param == "numba":
        request.getfixturevalue("numba_kernels")
        yield contextlib.nullcontext
    else:
        yield use_reference


def _build(cls, sample, dtype):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    return cls(*args, **kwargs).to(dtype)


def _clone_inputs(sample):
    return copy.deepcopy(sample.forward_input.args), copy.deepcopy(sample.forward_input.kwargs)


def _differs_on(name, state_key):
    return (name, state_key.rsplit(".", 1)[-1]) in DIFFERENCES


@pytest.mark.parametrize("info, dtype, training, index", list(_cases()))
def test_sample_matches_torch(info, dtype, training, index, path):
    name = info.module_cls.__name__
    sample = _samples(info, dtype, training)[index]
    torch.manual_seed(0)
    theirs = _build(info.module_cls, sample, dtype)
    ours = _build(DROP_INS[info.module_cls], sample, dtype)
    ours.load_state_dict(theirs.state_dict())  # the same state both ways
    with torch.no_grad():  # non-trivial affine parameters
        for p, q in zip(theirs.parameters(), ours.parameters(), strict=True):
            p.copy_(torch.rand_like(p) + 0.5)
            q.copy_(p)
    theirs.train(training), ours.train(training)
    tol = TOLERANCE[dtype]
    with path():
        for _step in range(2):
            (t_args, t_kwargs), (o_args, o_kwargs) = _clone_inputs(sample), _clone_inputs(sample)
            expected, got = theirs(*t_args, **t_kwargs), ours(*o_args, **o_kwargs)
            torch.testing.assert_close(got, expected, **tol)
            grad = torch.randn_like(expected)
            expected.backward(grad), got.backward(grad)
            for a, b in zip(o_args, t_args, strict=True):
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    torch.testing.assert_close(a.grad, b.grad, **tol)
            for (key, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, **tol, msg=key)
            for key, value in theirs.state_dict().items():
                if not _differs_on(name, key):
                    torch.testing.assert_close(ours.state_dict()[key], value, **tol, msg=key)
        x = sample.forward_input.args[0]
        if dtype == torch.float64 and x.numel() > 0:  # the layer's own derivatives
            names = [key for key, _ in ours.named_parameters()]

            def fn(x, *params):  # noqa: ANN001, ANN202
                return torch.func.functional_call(ours, dict(zip(names, params, strict=True)), (x,))

            inputs = (x.detach().clone().requires_grad_(),)
            inputs += tuple(p.detach().clone().requires_grad_() for p in ours.parameters())
            assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
            assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def _error_cases():
    for info in INFOS:
        if info.module_error_inputs_func is None:
            continue
        for dtype in DTYPES:
            for training in (True, False):
                errors = info.module_error_inputs_func(
                    info, device="cpu", dtype=dtype, requires_grad=False, training=training
                )
                for i, _ in enumerate(errors):
                    name = f"{info.module_cls.__name__}-{i}-{dtype}-"
                    name += "train" if training else "eval"
                    yield pytest.param(info, dtype, training, i, id=name)


@pytest.mark.parametrize("info, dtype, training, index", list(_error_cases()))
def test_error_input_raises_as_torch(info, dtype, training, index, path):
    error = info.module_error_inputs_func(
        info, device="cpu", dtype=dtype, requires_grad=False, training=training
    )[index]
    sample = error.module_error_input
    # torch raises this in training (its batch norm accepts eps = 0 in eval, and words
    # eps < 0 otherwise there); normlab always raises it, with its own wording
    # ("<Layer>: expected …, got …"), at construction where torch raises in forward
    if training:
        with pytest.raises(error.error_type, match=error.error_regex):  # torch, as a check
            m = _build(info.module_cls, sample, dtype).train(training)
            if error.error_on == ModuleErrorEnum.FORWARD_ERROR:
                m(*sample.forward_input.args, **sample.forward_input.kwargs)
    with path(), pytest.raises(error.error_type, match="expected"):
        m = _build(DROP_INS[info.module_cls], sample, dtype).train(training)
        if error.error_on == ModuleErrorEnum.FORWARD_ERROR:
            m(*sample.forward_input.args, **sample.forward_input.kwargs)
