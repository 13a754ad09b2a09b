"""The batch-noise measurement: a hand-computed batch-norm case, the zero of per-sample
norms, buffers left alone, and the records of `--experiment noise`."""

import itertools
import math

import pytest
import torch
from torch import nn

import normlab
from normlab.lab.data import load_data
from normlab.lab.models import build_model
from normlab.lab.noise import draw_companions, measure_batch_noise, noise_ratio
from normlab.lab.train import RunConfig, train_run


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_one_feature_batch_norm_against_enumerated_companions():
    # BN over one feature: the probe's output is (x − μ_B)/sqrt(σ²_B + ε). Every pair of
    # companions from a pool of 6 values, enumerated, the spread computed in float64.
    pool = torch.tensor([[-1.3], [0.2], [0.7], [2.5], [-0.4], [1.1]])
    probes = torch.tensor([[0.0], [1.5], [-2.0], [0.9]])
    pairs = list(itertools.combinations(range(len(pool)), 2))
    companions = torch.tensor(pairs).expand(len(probes), -1, -1)
    model = nn.Sequential(normlab.BatchNorm1d(1))
    result = measure_batch_noise(model, probes, pool, companions)

    eps = 1e-5
    outputs = []  # outputs[p][k]
    for p in probes[:, 0].tolist():
        row = []
        for i, j in pairs:
            batch = [p, pool[i, 0].item(), pool[j, 0].item()]
            mu = math.fsum(batch) / 3
            var = math.fsum((v - mu) ** 2 for v in batch) / 3
            row.append((p - mu) / math.sqrt(var + eps))
        outputs.append(row)

    def pstd(values):
        m = math.fsum(values) / len(values)
        return math.sqrt(math.fsum((v - m) ** 2 for v in values) / len(values))

    within = math.fsum(pstd(row) for row in outputs) / len(outputs)
    across = pstd([math.fsum(row) / len(row) for row in outputs])
    assert result.batch_noise == pytest.approx(within / across, rel=1e-5)
    assert result.layers == {"0": pytest.approx(within / across, rel=1e-5)}


def test_the_measurement_leaves_buffers_and_mode_alone():
    model = nn.Sequential(nn.Linear(3, 4), normlab.BatchNorm1d(4), nn.Linear(4, 2))
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx = draw_companions(20, probes=3, companions=4, batch_size=5, seed=1)
    result = measure_batch_noise(model, torch.randn(3, 3), torch.randn(20, 3), idx)
    assert result.batch_noise > 0 and not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("model", ["cnn", "rnn"])
def test_per_sample_norms_measure_zero_and_batch_norm_shrinks_with_the_batch(model):
    data = load_data("digits", limit=80)
    probes, pool = data.x_test[:8], data.x_train
    noise = {}
    for norm in ("bn", "ln", "wn"):
        torch.manual_seed(0)
        net = build_model(model, norm, image_shape=data.image_shape, num_classes=10)
        for b in (4, 32):
            idx = draw_companions(len(pool), probes=8, companions=6, batch_size=b, seed=0)
            noise[(norm, b)] = measure_batch_noise(net, probes, pool, idx)
    for norm in ("ln", "wn"):
        for b in (4, 32):
            assert noise[(norm, b)].batch_noise < 1e-5
            assert all(v < 1e-5 for v in noise[(norm, b)].layers.values()), noise[(norm, b)]
    assert noise[("bn", 4)].batch_noise > noise[("bn", 32)].batch_noise > 1e-3


def test_noise_ratio_and_companions():
    same = torch.randn(5, 1, 3).expand(5, 4, 3)
    assert noise_ratio(same) == 0.0
    outputs = torch.randn(6, 7, 2, dtype=torch.float64)
    within = outputs.std(1, correction=0).mean()
    across = outputs.mean(1).std(0, correction=0).mean()
    assert noise_ratio(outputs) == pytest.approx(float(within / across))
    with pytest.raises(ValueError, match="expected outputs"):
        noise_ratio(torch.randn(3, 4))
    idx = draw_companions(10, probes=3, companions=5, batch_size=6, seed=0)
    assert idx.shape == (3, 5, 5)
    assert all(len(set(row.tolist())) == 5 for row in idx.reshape(-1, 5))
    assert torch.equal(idx, draw_companions(10, probes=3, companions=5, batch_size=6, seed=0))
    with pytest.raises(ValueError, match="batch_size <= 11"):
        draw_companions(10, probes=3, companions=5, batch_size=12)


def test_noise_runs_record_batch_noise():
    data = load_data("digits", limit=40)
    for norm, small in (("bn", False), ("ln", True)):
        config = RunConfig(norm=norm, batch_size=4, epochs=1, probes=8, companions=4)
        record = train_run(config, data)
        assert record["noise_probes"] == 8 and record["noise_companions"] == 4
        assert (record["batch_noise"] < 1e-5) == small
        assert set(record["batch_noise_layers"]) == {f"features.{i}" for i in (1, 4, 7, 10, 13)}


class _Listed(torch.utils.data.Dataset):
    """The same examples as a TensorDataset, read one by one (no tensors to index)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_noise_and_weight_norm_init_read_from_datasets_as_from_tensors():
    # A run reads its probes, companions and weight-norm init batch from the Datasets by
    # index: the records equal those of the same data held as tensors.
    from normlab.lab.sources import LoadedData

    data = load_data("digits", limit=40)
    tensors = LoadedData(
        "digits",
        torch.utils.data.TensorDataset(data.x_train, data.y_train),
        torch.utils.data.TensorDataset(data.x_test, data.y_test),
        data.image_shape,
        data.num_classes,
    )
    listed = LoadedData(
        "digits",
        _Listed(data.x_train, data.y_train),
        _Listed(data.x_test, data.y_test),
        data.image_shape,
        data.num_classes,
    )
    for norm in ("bn", "wn"):
        config = RunConfig(norm=norm, batch_size=4, epochs=1, probes=4, companions=3)
        a, b = train_run(config, tensors), train_run(config, listed)
        for field in ("batch_noise", "batch_noise_layers", "accuracy", "train_loss"):
            assert a[field] == b[field], (norm, field)
