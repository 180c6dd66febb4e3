"""ops.compute_noisy_weight, the eager forward mode's per-layer call, trimmed for host time: entering no_grad
only where grad mode is on, a linear weight as its own (m, n) view, empty_like for plain tensors. The output
must stay what it was: a fresh contiguous tensor in W's storage shape, outside autograd, the same bits."""

import pytest
import torch

from flatlora.core import ops
from flatlora.kernels import philox


@pytest.mark.parametrize("shape,transposed", [((6, 10), False), ((10, 6), True), ((6, 2, 3, 3), False)])
def test_noisy_weight_is_a_fresh_detached_copy_in_any_grad_mode(shape, transposed):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(shape, generator=g).to(torch.bfloat16))  # trains: Flat full fine-tuning
    m = shape[1] if transposed else shape[0]
    n = w.numel() // m
    std = torch.rand(m, generator=g) * 0.1
    key = 2**63 + 5
    with torch.no_grad():
        off = ops.compute_noisy_weight(w, std, key, m, 0, transposed, "philox", "torch")
    on = ops.compute_noisy_weight(w, std, key, m, 0, transposed, "philox", "torch")  # grad mode on
    for out in (off, on):
        assert type(out) is torch.Tensor and out.shape == w.shape and out.is_contiguous()
        assert out.grad_fn is None and not out.requires_grad and out.data_ptr() != w.data_ptr()
    assert torch.equal(on.view(torch.int16), off.view(torch.int16))
    mat = w.detach().t() if transposed else w.detach().reshape(m, n)
    eps = philox.standard_normal_rows(key, m, n, "cpu") * std[:, None]
    got = on.t() if transposed else on.reshape(m, n)
    assert torch.equal(got.view(torch.int16), (mat.float() + eps).to(torch.bfloat16).view(torch.int16))


def test_a_tensor_subclass_weight_gets_a_plain_output():
    class Tagged(torch.Tensor):
        pass

    w = torch.randn(4, 8).as_subclass(Tagged)
    out = ops.compute_noisy_weight(w, torch.full((4,), 0.1), 3, 4, 0, False, "torch", "torch")
    assert type(out) is torch.Tensor and out.shape == (4, 8)
