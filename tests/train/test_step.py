import pytest
import torch

from observatory.spec import load_run_spec
from observatory.store import FamilyStore
from observatory.train import (
    train_family,
)
from tests.conftest import TINY_TOML, assert_stores_identical, write_spec


def test_the_training_device_is_recorded_with_the_run(trained_tiny):
    _, store = trained_tiny
    devices = FamilyStore(store).run("l2-d16", 0).attrs["devices"]
    assert [d["type"] for d in devices] == ["cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_one_line_error(tmp_path, capsys):
    from observatory.cli import main

    text = TINY_TOML.replace("context = 16\n", 'context = 16\ndevice = "cuda"\n')
    store = tmp_path / "gpu.zarr"
    assert main(["train", str(write_spec(tmp_path, text)), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.device: 'cuda' but no CUDA device" in err
    assert not store.exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_is_deterministic_and_records_the_gpu(tmp_path):
    text = TINY_TOML.replace("context = 16\n", 'context = 16\ndevice = "cuda"\n')
    spec = load_run_spec(write_spec(tmp_path, text))
    first = train_family(spec, store=tmp_path / "a.zarr", progress=False)
    second = train_family(spec, store=tmp_path / "b.zarr", progress=False)
    assert_stores_identical(first, second)
    (device,) = FamilyStore(first).run("l2-d16", 0).attrs["devices"]
    assert device["type"] == "cuda" and device["name"] == torch.cuda.get_device_name()
    assert device["cuda"] == torch.version.cuda
    # resuming on the GPU continues exactly, as on the CPU
    train_family(spec, store=tmp_path / "c.zarr", progress=False, stop_after=9)
    train_family(spec, store=tmp_path / "c.zarr", progress=False, resume=True)
    assert_stores_identical(first, tmp_path / "c.zarr")


@pytest.mark.parametrize(("grad_clip", "scale"), [(1.0, 3.0), (1.0, 0.25), (0.0, 3.0)])
def test_clip_factor_is_the_factor_clipping_applied(grad_clip, scale):
    from observatory.train.step import clip_factor

    param = torch.nn.Parameter(torch.zeros(5))
    param.grad = torch.linspace(-1, 1, 5) * scale
    before = param.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_([param], grad_clip or float("inf"))
    factor = clip_factor(grad_clip, float(norm))
    torch.testing.assert_close(param.grad, before * factor, rtol=1e-6, atol=0)
    assert (factor < 1) == bool(grad_clip and norm > grad_clip)
