"""InvertibleDownsampling / InvertibleUpsampling: orthogonality, Haar and Squeeze inits,
bijector properties in 1D, 2D and 3D for every parametrisation, and error messages."""

from __future__ import annotations

import math

import pytest
import torch

from flows.transforms.downsampling import InvertibleDownsampling, InvertibleUpsampling, haar_matrix
from flows.transforms.squeeze import Squeeze

METHODS = ["exp", "cayley", "householder"]
SHAPES = {1: (3, 8), 2: (2, 4, 6), 3: (2, 4, 2, 6)}  # (C, *S) per number of spatial axes


def perturbed(
    layer: InvertibleDownsampling, scale: float = 0.3, seed: int = 0
) -> InvertibleDownsampling:
    """Move the parameter away from its (identity-giving) start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight.add_(scale * torch.randn(layer.weight.shape, generator=g))
    return layer


def haar_reference(x: torch.Tensor) -> torch.Tensor:
    """Separable orthonormal Haar transform, axis by axis: channel c -> (2c + bit) per axis."""
    for axis in range(2, x.dim()):
        even = x.narrow(axis, 0, x.shape[axis] // 2 * 2)
        shape = list(even.shape)
        shape[axis : axis + 1] = [shape[axis] // 2, 2]
        pairs = even.reshape(shape)
        first, second = pairs.select(axis + 1, 0), pairs.select(axis + 1, 1)
        low, high = (first + second) / math.sqrt(2), (first - second) / math.sqrt(2)
        x = torch.stack([low, high], dim=2).flatten(1, 2)
    return x


def squeeze_reference(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """Space-to-depth: channel c * P + p holds channel c at row-major patch offset p."""
    b, c, *size = x.shape
    d = len(size)
    split = [b, c]
    for n, s in zip(size, stride):
        split += [n // s, s]
    order = [0, 1, *(3 + 2 * i for i in range(d)), *(2 + 2 * i for i in range(d))]
    out = x.reshape(split).permute(order)
    return out.reshape(b, c * math.prod(stride), *(n // s for n, s in zip(size, stride)))


@pytest.mark.parametrize("full", [False, True], ids=["per-channel", "full"])
@pytest.mark.parametrize("method", METHODS)
def test_kernel_stays_orthogonal_under_training(method: str, full: bool) -> None:
    torch.manual_seed(0)
    layer = InvertibleDownsampling(3, stride=2, method=method, init="random", full=full)
    opt = torch.optim.Adam(layer.parameters(), lr=0.1)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 12, 4, 4)
    start = layer.kernel_matrix().detach().clone()
    for _ in range(5):
        opt.zero_grad()
        ((layer(x)[0] - target) ** 2).mean().backward()
        opt.step()
    m = layer.kernel_matrix().detach()
    assert not torch.allclose(m, start, atol=1e-3), "training did not move the kernel"
    eye = torch.eye(layer.n).expand_as(m)
    torch.testing.assert_close(m @ m.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    # float32 rounding scales with |x| (up to ~4 here): relative as well as absolute.
    torch.testing.assert_close(layer.inverse(layer(x)[0])[0], x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_haar_init_is_the_haar_transform(dims: int, method: str) -> None:
    x = torch.randn(2, *SHAPES[dims])
    layer = InvertibleDownsampling(x.shape[1], stride=2, dims=dims, method=method, init="haar")
    torch.testing.assert_close(layer(x)[0], haar_reference(x), atol=1e-6, rtol=0)


def test_haar_2d_subbands_by_formula() -> None:
    x = torch.randn(1, 1, 4, 4)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    expected = torch.cat([a + b + c + d, a - b + c - d, a + b - c - d, a - b - c + d], 1) / 2
    torch.testing.assert_close(InvertibleDownsampling(1, 2)(x)[0], expected, atol=1e-6, rtol=0)


def test_haar_init_is_exact() -> None:
    for method in METHODS:
        layer = InvertibleDownsampling(2, stride=(2, 1, 2), method=method, init="haar")
        assert torch.equal(layer.kernel_matrix(), layer.initial_matrix()), method


@pytest.mark.parametrize("method", METHODS)
def test_squeeze_init_equals_squeeze(method: str) -> None:
    x = torch.randn(2, 3, 6, 4)
    layer = InvertibleDownsampling(3, stride=2, method=method, init="squeeze")
    assert torch.equal(layer(x)[0], Squeeze()(x)[0])
    assert torch.equal(layer.inverse(Squeeze()(x)[0])[0], x)


@pytest.mark.parametrize("stride", [(2,), (3, 2), (2, 1, 3)], ids=str)
def test_squeeze_init_any_dims_and_stride(stride: tuple[int, ...]) -> None:
    size = [6, 4, 6][: len(stride)]
    x = torch.randn(2, 2, *size)
    layer = InvertibleDownsampling(2, stride=stride, init="squeeze")
    assert torch.equal(layer(x)[0], squeeze_reference(x, stride))


@pytest.mark.parametrize("full", [False, True], ids=["per-channel", "full"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bijector_properties(dims: int, method: str, full: bool) -> None:
    torch.manual_seed(1)
    c, *size = SHAPES[dims]
    stride = {1: (2,), 2: (2, 3), 3: (2, 2, 1)}[dims]  # anisotropic in 2D and 3D
    layer = perturbed(InvertibleDownsampling(c, stride, method, init="random", full=full)).double()
    x = torch.randn(3, c, *size, dtype=torch.float64)
    y, logdet = layer(x)
    assert y.shape == (3, c * math.prod(stride), *(n // s for n, s in zip(size, stride)))
    assert (
        logdet.shape == (3,)
        and logdet.dtype == x.dtype
        and torch.equal(logdet, torch.zeros(3, dtype=x.dtype))
    )
    x_back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=0)
    assert torch.equal(inv_logdet, torch.zeros(3, dtype=x.dtype))
    # Brute-force Jacobian of one sample: orthogonal, so log|det| = 0.
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0], x[:1]).reshape(x[0].numel(), -1)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0 and abs(logabsdet.item()) < 1e-10
    torch.testing.assert_close(
        jac @ jac.T, torch.eye(jac.shape[0], dtype=x.dtype), atol=1e-10, rtol=0
    )
    # Batch independence.
    torch.testing.assert_close(layer(x[:1])[0], y[:1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_upsampling_is_the_inverse(dims: int) -> None:
    torch.manual_seed(2)
    factor = 2**dims
    up = InvertibleUpsampling(2 * factor, stride=2, dims=dims, init="random")
    perturbed(up.downsampling)
    y = torch.randn(2, 2 * factor, *([3] * dims))
    x, logdet = up(y)
    assert x.shape == (2, 2, *([6] * dims))
    assert torch.equal(logdet, torch.zeros(2))
    torch.testing.assert_close(x, up.downsampling.inverse(y)[0])
    torch.testing.assert_close(up.inverse(x)[0], y, atol=1e-5, rtol=0)


def test_gradients_and_state_dict() -> None:
    layer = perturbed(InvertibleDownsampling(2, stride=2, dims=3, method="cayley"))
    layer(torch.randn(2, 2, 4, 4, 4))[0].pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    other = InvertibleDownsampling(2, stride=2, dims=3, method="cayley")
    other.load_state_dict(layer.state_dict())
    torch.testing.assert_close(other.kernel_matrix(), layer.kernel_matrix())


def test_not_learnable_has_no_parameters() -> None:
    layer = InvertibleDownsampling(2, stride=2, learnable=False)
    assert list(layer.parameters()) == []
    assert torch.equal(layer.kernel_matrix(), layer.initial_matrix())


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"channels must be an integer >= 1, got 2\.5"):
        InvertibleDownsampling(2.5)
    layer = InvertibleDownsampling(3, stride=(2, 3), init="squeeze")
    with pytest.raises(
        ValueError, match=r"axis W \(tensor dim 3\) has size 7, not divisible by its stride 3"
    ):
        layer(torch.randn(1, 3, 4, 7))
    with pytest.raises(ValueError, match=r"axis D \(tensor dim 2\)"):
        InvertibleDownsampling(1, stride=2, dims=3)(torch.randn(1, 1, 3, 4, 4))
    with pytest.raises(ValueError, match="expected 3 channels"):
        layer(torch.randn(1, 2, 4, 6))
    with pytest.raises(ValueError, match="expected 18 channels"):
        layer.inverse(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match=r"expected input of shape \(B, C, H, W\)"):
        layer(torch.randn(1, 3, 4))
    with pytest.raises(ValueError, match="^InvertibleDownsampling: init='haar' needs strides of 1 or 2"):
        InvertibleDownsampling(1, stride=3, init="haar")
    with pytest.raises(ValueError, match="method must be one of"):
        InvertibleDownsampling(1, method="svd")
    with pytest.raises(ValueError, match="divisible by the stride product 4"):
        InvertibleUpsampling(6, stride=2)
    with pytest.raises(ValueError, match=r"^InvertibleDownsampling: stride \(2, 2, 2\) has 3 entries but dims=2$"):
        InvertibleDownsampling(1, stride=(2, 2, 2), dims=2)


def test_option_errors_name_the_layer() -> None:
    with pytest.raises(ValueError, match="^InvertibleDownsampling: dims must be 1, 2 or 3, got 4$"):
        InvertibleDownsampling(1, dims=4)
    with pytest.raises(ValueError, match=r"^InvertibleUpsampling: every stride must be >= 1, got \(0, 2\)$"):
        InvertibleUpsampling(4, stride=(0, 2))
    with pytest.raises(ValueError, match="^InvertibleUpsampling: init must be one of"):
        InvertibleUpsampling(4, init="wavelet")
    with pytest.raises(ValueError, match="^InvertibleUpsampling: init='haar' needs strides of 1 or 2"):
        InvertibleUpsampling(9, stride=3)
    with pytest.raises(ValueError, match="^haar_matrix: init='haar' needs strides of 1 or 2"):
        haar_matrix((3,))
