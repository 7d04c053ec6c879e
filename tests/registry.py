"""Every bijector and model at toy size, for the generic property suite.

Each entry is ``id: Case(factory, event_shape, sample)``. ``factory()`` builds a fresh
float32 module; ``sample(n)`` draws valid inputs (standard normal unless the bijector
has a restricted domain). Adding a bijector to the suite is one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flows.models import MAF, NSF, Glow, IResNet, RealNVP
from flows.nn.meft import MEFTBlock
from flows.transforms import (
    ActNorm,
    AdditiveCoupling,
    AffineCoupling,
    Chain,
    InvConv1x1,
    Inverse,
    InvertibleDownsampling,
    InvertibleUpsampling,
    Logit,
    MaskedAutoregressive,
    Permute,
    RationalQuadraticCoupling,
    Reshape,
    ResidualBlock,
    RevCoupling,
    Squeeze,
    Tail,
    channel_mask,
    checkerboard_mask,
)


def _normal(shape: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randn(n, *shape)


def _unit(shape: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    return lambda n: 0.02 + 0.96 * torch.rand(n, *shape)


@dataclass
class Case:
    factory: Callable[[], torch.nn.Module]
    event_shape: tuple[int, ...]
    sample: Callable[[int], torch.Tensor] | None = field(default=None)
    # atol (times the largest gradient) of the float32 gradient parity between memory-saving
    # and ordinary backward; loosened only where a parametrisation amplifies rounding.
    float32_grad_atol: float = 1e-6
    # Conditional cases: draws the raw context of n examples (float vectors, or int64
    # labels for a model that embeds them); None for unconditional cases.
    context: Callable[[int], torch.Tensor] | None = field(default=None)

    def draw(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        sampler = self.sample or _normal(self.event_shape)
        return sampler(n).to(dtype)

    def draw_context(self, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        if self.context is None:
            return None
        c = self.context(n)
        return c.to(dtype) if c.is_floating_point() else c


def _memory_saving(chain: Chain) -> Chain:
    chain.memory_saving = True
    return chain


def _mixed_chain() -> Chain:
    return Chain(
        ActNorm(4),
        InvConv1x1(4, lu=True),
        AffineCoupling(checkerboard_mask(4, 4, 1), channels=4, hidden_channels=8),
        Permute(4, "shuffle", seed=1),
        AdditiveCoupling(channel_mask(4, 1), hidden_channels=8),
    )


def _residual_mlp() -> ResidualBlock:
    return ResidualBlock.mlp(3, 16, logdet="exact", max_iter=1000)


def _residual_conv() -> ResidualBlock:
    return ResidualBlock.conv(2, 8, logdet="exact", max_iter=1000)


def _residual_stochastic(logdet: str, image: bool) -> ResidualBlock:
    # Lipschitz 0.5 keeps the series' truncation bias (series: D 0.5^9 / 4.5 < 1e-3) and the
    # roulette's variance small, so the suite's statistical log-det check stays tight.
    kw = dict(lipschitz=0.5, logdet=logdet, n_terms=8, max_iter=1000)
    return ResidualBlock.conv(2, 8, **kw) if image else ResidualBlock.mlp(3, 16, **kw)


def _spline(mask: torch.Tensor, **kw) -> RationalQuadraticCoupling:
    return RationalQuadraticCoupling(mask, hidden_channels=8, **kw)


def _spline_both_halves(context_features: int | None = None) -> RationalQuadraticCoupling:
    coupling = _spline(
        torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0]), bins=5, tail_bound=2.0, image=False, identity_init=False,
        transform_kept=True, context_features=context_features,
    )
    with torch.no_grad():  # away from the identity the kept half's spline starts at
        coupling.kept_spline.normal_(generator=torch.Generator().manual_seed(0))
    return coupling


def _meft_block() -> MEFTBlock:
    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))

    return MEFTBlock(net(), net(), a=1.0, b=0.5, swap=True)


def _rev_coupling(features: int, image: bool) -> RevCoupling:
    half = features // 2

    def net() -> nn.Module:
        if image:
            return nn.Sequential(nn.Conv2d(half, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, half, 3, padding=1))
        return nn.Sequential(nn.Linear(half, 8), nn.Tanh(), nn.Linear(8, half))

    return RevCoupling(net(), net(), a=0.8, b=1.25)


def _downsampling(method: str, shape: tuple[int, ...], stride: int | tuple[int, ...] = 2) -> Case:
    # Householder vectors enter as v v^T / |v|^2: their gradient scales float32 rounding of
    # the reconstructed input by 1 / |v|, hence the looser float32 parity.
    return Case(
        lambda: InvertibleDownsampling(shape[0], stride, method=method, init="random", dims=len(shape) - 1),
        shape,
        float32_grad_atol=1e-5 if method == "householder" else 1e-6,
    )


def _glow(**kw) -> Callable[[], torch.nn.Module]:
    return lambda: Glow((2, 4, 4), levels=2, steps=1, hidden_channels=8, **kw)


def _vectors(features: int) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randn(n, features)


def _labels(classes: int) -> Callable[[int], torch.Tensor]:
    return lambda n: torch.randint(0, classes, (n,))


def _conditional_chain() -> Chain:
    return _memory_saving(
        Chain(
            ActNorm(4),
            AffineCoupling(channel_mask(4, 0), hidden_channels=8, context_features=3),
            InvConv1x1(4, lu=True),
            AdditiveCoupling(checkerboard_mask(4, 4, 1), channels=4, hidden_channels=8, context_features=3),
        )
    )


CONDITIONAL_CASES: dict[str, Case] = {
    "affine-channel-context": Case(
        lambda: AffineCoupling(channel_mask(4, 1), hidden_channels=8, context_features=3),
        (4, 4, 4),
        context=_vectors(3),
    ),
    "affine-checker-context": Case(
        lambda: AffineCoupling(checkerboard_mask(4, 4, 0), channels=2, hidden_channels=8, context_features=2),
        (2, 4, 4),
        context=_vectors(2),
    ),
    "affine-vector-context": Case(
        lambda: AffineCoupling(channel_mask(5, 0), hidden_channels=8, image=False, context_features=2),
        (5,),
        context=_vectors(2),
    ),
    "additive-channel-3d-context": Case(
        lambda: AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=3, context_features=2),
        (4, 2, 2, 3),
        context=_vectors(2),
    ),
    "residual-mlp-context": Case(
        lambda: ResidualBlock.mlp(3, 16, logdet="exact", max_iter=1000, context_features=2), (3,), context=_vectors(2)
    ),
    "residual-conv-context": Case(
        lambda: ResidualBlock.conv(2, 8, logdet="exact", max_iter=1000, context_features=3),
        (2, 4, 4),
        context=_vectors(3),
    ),
    "chain-memory-saving-context": Case(_conditional_chain, (4, 4, 4), context=_vectors(3)),
    "glow-context-split-prior": Case(
        _glow(split_prior=True, context_features=3), (2, 4, 4), _unit((2, 4, 4)), context=_vectors(3)
    ),
    "glow-classes": Case(_glow(num_classes=4), (2, 4, 4), _unit((2, 4, 4)), context=_labels(4)),
    "glow-vector-context": Case(
        lambda: Glow((2,), levels=2, steps=2, hidden_channels=8, context_features=2), (2,), context=_vectors(2)
    ),
    "realnvp-classes": Case(
        lambda: RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=8, res_blocks=1, num_classes=3),
        (1, 4, 4),
        _unit((1, 4, 4)),
        context=_labels(3),
    ),
    "spline-vector-context": Case(
        lambda: RationalQuadraticCoupling(channel_mask(4, 0), image=False, hidden_channels=8, context_features=2),
        (4,),
        context=_vectors(2),
    ),
    "spline-both-halves-context": Case(lambda: _spline_both_halves(2), (5,), context=_vectors(2)),
    "maf-posterior": Case(
        lambda: MAF((4,), steps=2, hidden_channels=16, context_features=3), (4,), context=_vectors(3)
    ),
    "nsf-posterior": Case(
        lambda: NSF((5,), steps=2, hidden_channels=8, bins=4, context_features=5), (5,), context=_vectors(5)
    ),
    "iresnet-context": Case(
        lambda: IResNet((2,), levels=1, blocks=2, hidden_channels=8, logdet="exact", context_features=2),
        (2,),
        context=_vectors(2),
    ),
}


CASES: dict[str, Case] = {
    "additive-channel": Case(lambda: AdditiveCoupling(channel_mask(4, 0), hidden_channels=8), (4, 4, 4)),
    "additive-checker": Case(
        lambda: AdditiveCoupling(checkerboard_mask(4, 4, 1), channels=3, hidden_channels=8), (3, 4, 4)
    ),
    "additive-vector": Case(lambda: AdditiveCoupling(channel_mask(5, 1), hidden_channels=8, image=False), (5,)),
    "affine-channel": Case(lambda: AffineCoupling(channel_mask(4, 1), hidden_channels=8), (4, 4, 4)),
    "affine-checker": Case(
        lambda: AffineCoupling(checkerboard_mask(4, 6, 0), channels=2, hidden_channels=8), (2, 4, 6)
    ),
    "affine-vector": Case(lambda: AffineCoupling(channel_mask(6, 0), hidden_channels=8, image=False), (6,)),
    "additive-channel-1d": Case(lambda: AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=1), (4, 6)),
    "affine-channel-1d": Case(lambda: AffineCoupling(channel_mask(5, 1), hidden_channels=8, dims=1), (5, 6)),
    "additive-channel-3d": Case(lambda: AdditiveCoupling(channel_mask(4, 0), hidden_channels=8, dims=3), (4, 2, 2, 3)),
    "affine-channel-3d": Case(lambda: AffineCoupling(channel_mask(4, 1), hidden_channels=8, dims=3), (4, 2, 4, 2)),
    "spline-vector": Case(lambda: _spline(channel_mask(5, 1), bins=6, image=False), (5,)),
    "spline-checker": Case(lambda: _spline(checkerboard_mask(4, 4, 1), channels=2, bins=4, tail_bound=2.0), (2, 4, 4)),
    "spline-channel-3d": Case(lambda: _spline(channel_mask(4, 0), dims=3), (4, 2, 2, 2)),
    "nsf": Case(lambda: NSF((3,), steps=3, hidden_channels=8, bins=5, tail_bound=3.0), (3,)),
    "spline-both-halves": Case(_spline_both_halves, (5,)),
    "maf-block": Case(lambda: MaskedAutoregressive(4, 16), (4,)),
    "maf-spline-block": Case(lambda: MaskedAutoregressive(3, 16, transform="spline", bins=5, tail_bound=3.0), (3,)),
    "iaf-block": Case(lambda: Inverse(MaskedAutoregressive(4, 16)), (4,)),
    "maf": Case(lambda: MAF((3,), steps=3, hidden_channels=16), (3,)),
    "realnvp-spline": Case(
        lambda: RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=8, res_blocks=1, coupling="spline"),
        (1, 4, 4),
        _unit((1, 4, 4)),
    ),
    "glow-spline": Case(_glow(coupling="spline"), (2, 4, 4), _unit((2, 4, 4))),
    "affine-interleaved": Case(lambda: AffineCoupling(torch.tensor([1, 0, 0, 1, 0]), hidden_channels=8), (5, 3, 3)),
    "affine-sigmoid-normalized": Case(
        lambda: AffineCoupling(channel_mask(4, 1), hidden_channels=8, scale="sigmoid", normalize=True), (4, 4, 4)
    ),
    "realnvp-vector-sampling-exp": Case(
        lambda: RealNVP((4,), levels=1, steps=2, hidden_channels=8, direction="sampling", scale="exp"), (4,)
    ),
    "glow-no-split-prior": Case(_glow(split_prior=False), (2, 4, 4), _unit((2, 4, 4))),
    "glow-normalized": Case(_glow(normalize=True), (2, 4, 4), _unit((2, 4, 4))),
    "squeeze": Case(Squeeze, (2, 4, 6)),
    "invconv-dense": Case(lambda: InvConv1x1(3), (3, 4, 4)),
    "invconv-lu": Case(lambda: InvConv1x1(4, lu=True), (4, 3, 3)),
    "invconv-vector": Case(lambda: InvConv1x1(5, lu=True), (5,)),
    "actnorm-image": Case(lambda: ActNorm(3), (3, 4, 4)),
    "actnorm-vector": Case(lambda: ActNorm(5), (5,)),
    "permute-reverse": Case(lambda: Permute(4), (4, 2, 2)),
    "permute-shuffle": Case(lambda: Permute(6, "shuffle", seed=0), (6,)),
    "logit": Case(lambda: Logit(0.05), (1, 4, 4), _unit((1, 4, 4))),
    "reshape": Case(lambda: Reshape((2, 3, 2), (12,)), (2, 3, 2)),
    "tail": Case(lambda: Tail(AffineCoupling(channel_mask(2, 0), hidden_channels=8), 8, (2, 2, 2)), (16,)),
    "inverse-affine": Case(lambda: Inverse(AffineCoupling(channel_mask(4, 0), hidden_channels=8)), (4, 4, 4)),
    "inverse-squeeze": Case(lambda: Inverse(Squeeze()), (8, 2, 2)),
    "chain-mixed": Case(_mixed_chain, (4, 4, 4)),
    "chain-memory-saving": Case(lambda: _memory_saving(_mixed_chain()), (4, 4, 4)),
    "glow-affine-lu": Case(_glow(), (2, 4, 4), _unit((2, 4, 4))),
    "glow-additive-shuffle": Case(_glow(coupling="additive", permutation="shuffle"), (2, 4, 4), _unit((2, 4, 4))),
    "glow-dense-split-prior": Case(_glow(lu=False, split_prior=True), (2, 4, 4), _unit((2, 4, 4))),
    "glow-vector": Case(lambda: Glow((2,), levels=2, steps=2, hidden_channels=8), (2,)),
    "residual-mlp-exact": Case(_residual_mlp, (3,)),
    "residual-conv-exact": Case(_residual_conv, (2, 4, 4)),
    "residual-mlp-series": Case(lambda: _residual_stochastic("series", image=False), (3,)),
    "residual-conv-unbiased": Case(lambda: _residual_stochastic("unbiased", image=True), (2, 4, 4)),
    "meft-block": Case(_meft_block, (5, 6)),
    "rev-coupling-vector": Case(lambda: _rev_coupling(6, image=False), (6,)),
    "rev-coupling-image": Case(lambda: _rev_coupling(4, image=True), (4, 4, 4)),
    "downsampling-1d-exp": _downsampling("exp", (2, 8)),
    "downsampling-2d-cayley": _downsampling("cayley", (2, 4, 6)),
    "downsampling-2d-householder": _downsampling("householder", (1, 4, 4)),
    "downsampling-2d-anisotropic": _downsampling("exp", (1, 4, 6), (2, 3)),
    "downsampling-3d-exp": _downsampling("exp", (1, 4, 4, 2)),
    "upsampling-2d": Case(lambda: InvertibleUpsampling(4, 2, method="cayley", init="random"), (4, 2, 2)),
    "realnvp-image": Case(
        lambda: RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=8, res_blocks=1), (1, 4, 4), _unit((1, 4, 4))
    ),
    "glow-haar": Case(_glow(downsampling="haar"), (2, 4, 4), _unit((2, 4, 4))),
    "realnvp-learned-downsampling": Case(
        lambda: RealNVP((1, 4, 4), levels=2, steps=1, hidden_channels=8, res_blocks=1, downsampling="learned"),
        (1, 4, 4),
        _unit((1, 4, 4)),
    ),
    "iresnet-image": Case(
        lambda: IResNet((1, 4, 4), levels=2, blocks=1, hidden_channels=8, logdet="exact", max_iter=1000),
        (1, 4, 4),
        _unit((1, 4, 4)),
    ),
    "iresnet-vector": Case(lambda: IResNet((2,), levels=1, blocks=2, hidden_channels=8, logdet="exact"), (2,)),
    "realnvp-vector": Case(lambda: RealNVP((3,), levels=1, steps=3, hidden_channels=8), (3,)),
}
UNCONDITIONAL = sorted(CASES)
CASES.update(CONDITIONAL_CASES)
