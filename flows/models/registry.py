"""The model registry: names, builders, their defaults and the command-line options that set them.

:data:`MODELS` maps a name (``glow``, ``realnvp``, ``iresnet``, ``nsf``, ``maf``) to a :class:`ModelSpec`;
:data:`OPTIONS` lists the builder options the ``flows`` command exposes, each with the models
that read it. :func:`build_model` builds a registered model from builder keywords,
:func:`conditional_kwargs` gives the keywords that condition one on a dataset's labels or
context, and :func:`load_model` rebuilds one from a checkpoint of ``flows train`` (or the
``model.pt`` of a variational run).

Nothing here imports torch until a model is built, so ``flows --help`` starts fast.

Example:
    >>> model = build_model("glow", (1, 8, 8), levels=1, steps=1, hidden_channels=8)
    >>> type(model).__name__
    'Flow'
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from flows.data import Dataset


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        builder: ``"module:function"`` of the builder ``(input_shape, **kwargs) -> Flow``.
        summary: one line for ``--help``.
        depth: the builder keyword that counts flow steps per level (``steps`` or ``blocks``).
        defaults: the builder's defaults of the :data:`OPTIONS` it reads, as ``--help``
            shows them (a test checks them against the builder's signature).
    """

    builder: str
    summary: str
    depth: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Callable[..., nn.Module]:
        """The builder function (imports its module)."""
        module, _, name = self.builder.partition(":")
        return getattr(importlib.import_module(module), name)

    def keywords(self) -> dict[str, Any]:
        """The builder's keywords and their defaults (imports its module)."""
        parameters = inspect.signature(self.build()).parameters.values()
        return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


MODELS: dict[str, ModelSpec] = {
    "glow": ModelSpec(
        "flows.models.glow:Glow",
        "Glow, arXiv:1807.03039",
        depth="steps",
        defaults={
            "levels": 3,
            "steps": 8,
            "hidden_channels": 64,
            "coupling": "affine",
            "permutation": "conv1x1",
            "downsampling": "squeeze",
        },
    ),
    "realnvp": ModelSpec(
        "flows.models.realnvp:RealNVP",
        "RealNVP, arXiv:1605.08803",
        depth="steps",
        defaults={
            "levels": 2,
            "steps": 3,
            "hidden_channels": 64,
            "res_blocks": 2,
            "coupling": "affine",
            "downsampling": "squeeze",
            "direction": "density",
            "scale": "tanh",
        },
    ),
    "iresnet": ModelSpec(
        "flows.models.iresnet:IResNet",
        "i-ResNet, arXiv:1811.00995",
        depth="blocks",
        defaults={
            "levels": 3,
            "blocks": 4,
            "hidden_channels": 64,
            "lipschitz": 0.9,
            "logdet": "series",
            "n_terms": 5,
            "downsampling": "squeeze",
        },
    ),
    "nsf": ModelSpec(
        "flows.models.nsf:NSF",
        "neural spline flow for vectors, arXiv:1906.04032",
        depth="steps",
        defaults={"steps": 5, "hidden_channels": 64, "bins": 8},
    ),
    "maf": ModelSpec(
        "flows.models.maf:MAF",
        "masked autoregressive flow for vectors, arXiv:1705.07057",
        depth="steps",
        defaults={"steps": 5, "hidden_channels": 64, "transform": "affine", "bins": 8},
    ),
}
"""Model registry: name -> :class:`ModelSpec`."""

ALL = tuple(MODELS)
MULTISCALE = ("glow", "realnvp", "iresnet")


@dataclass(frozen=True)
class Option:
    """A builder option on the command line.

    Attributes:
        flags: the option strings, e.g. ``("--steps-per-level", "-K")``.
        kwarg: the builder keyword it sets (``"depth"``: the model's :attr:`ModelSpec.depth`).
        help: the help text (``--help`` appends the default).
        models: the models that read it; the others ignore it.
        type: ``"int"`` (at least 1), ``"float"``, ``"unit"`` (in (0, 1)) or ``None``.
        choices: the allowed values.
        value: for a switch (no argument), the builder value it sets when given.
    """

    flags: tuple[str, ...]
    kwarg: str
    help: str
    models: tuple[str, ...] = ALL
    type: str | None = "int"
    choices: tuple[str, ...] | None = None
    value: Any = None

    @property
    def dest(self) -> str:
        """The attribute name argparse gives it."""
        return self.flags[0].lstrip("-").replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(("--levels",), "levels", "scales of the model", MULTISCALE),
    Option(("--steps-per-level", "-K"), "depth", "flow steps (i-ResNet: residual blocks) per level; NSF/MAF: steps"),
    Option(("--hidden",), "hidden_channels", "conditioner width"),
    Option(
        ("--coupling",), "coupling", "coupling layer (realnvp: affine or spline)", ("glow", "realnvp"), None,
        ("affine", "additive", "spline"),
    ),
    Option(("--bins",), "bins", "spline bins", ("nsf", "maf")),
    Option(("--transform",), "transform", "elementwise map of each MAF block", ("maf",), None, ("affine", "spline")),
    Option(("--permutation",), "permutation", "channel mixing", ("glow",), None, ("conv1x1", "shuffle", "reverse")),
    Option(("--no-lu",), "lu", "dense instead of LU-decomposed 1x1 convolutions", ("glow",), None, value=False),
    Option(
        ("--split-prior",), "split_prior", "learned prior at factor-outs (glow: default)",
        ("glow", "realnvp"), None, value=True
    ),
    Option(("--no-split-prior",), "split_prior", "standard-normal prior at factor-outs", ("glow",), None, value=False),
    Option(("--res-blocks",), "res_blocks", "residual blocks per conditioner", ("realnvp",)),
    Option(
        ("--direction",),
        "direction",
        "vector RealNVP: the direction its couplings are written in (sampling: x = z exp(s) + t, for VI)",
        ("realnvp",),
        None,
        ("density", "sampling"),
    ),
    Option(
        ("--log-scale",),
        "scale",
        "affine couplings' log-scale map (tanh: bounded; sigmoid: Glow's; exp: unbounded, normflows' for VI)",
        ("realnvp",),
        None,
        ("tanh", "sigmoid", "exp"),
    ),
    Option(("--lipschitz",), "lipschitz", "Lipschitz bound of each residual branch", ("iresnet",), "unit"),
    Option(("--logdet",), "logdet", "log-det estimator", ("iresnet",), None, ("series", "unbiased", "exact")),
    Option(("--n-terms",), "n_terms", "power-series terms of the log-det", ("iresnet",)),
    Option(
        ("--downsampling",), "downsampling", "2x2 step between levels", MULTISCALE, None, ("squeeze", "haar", "learned")
    ),
)
"""The builder options of ``flows train`` and ``flows bench``, in ``--help`` order."""


DEFAULTS_VERSION = 5
"""Recorded in a run's model config: which builder defaults its left-out options had."""

NONE_KEPT_SINCE = 5
"""The defaults version from which a recorded ``None`` keyword is a value (``logit_alpha=None``:
no Logit). Before it :func:`build_model` dropped ``None`` keywords, so those options got the
builder's defaults, which :func:`config_kwargs` still gives such a config."""

LEGACY_DEFAULTS: dict[int, dict[str, dict[str, Any]]] = {
    1: {"glow": {"split_prior": False}},
    2: {"nsf": {"conditioner": "mlp"}},
    3: {"maf": {"scale": "tanh"}},
}
"""The builder defaults each version had where a later version changed them (version 2:
Glow's split prior; version 3: the conditional NSF's gated conditioner; version 4: MAF's
softplus scale; version 5 changed no default, see :data:`NONE_KEPT_SINCE`). A config of
version ``v`` (1 without ``defaults``) gets those of versions ``v`` and later, so its
checkpoint rebuilds the model it trained."""


def legacy_defaults(model: str, version: int) -> dict[str, Any]:
    """The builder keywords a config of defaults ``version`` left to defaults that changed since.

    Example:
        >>> legacy_defaults("glow", 1), legacy_defaults("nsf", 1), legacy_defaults("glow", DEFAULTS_VERSION)
        ({'split_prior': False}, {'conditioner': 'mlp'}, {})
    """
    out: dict[str, Any] = {}
    for since in sorted(v for v in LEGACY_DEFAULTS if v >= version):
        out = {**LEGACY_DEFAULTS[since].get(model, {}), **out}
    return out


def option_default(option: Option) -> str | None:
    """The default of ``option`` per model, as ``--help`` prints it (``None``: not shown)."""
    if option.value is not None:
        return None
    values = {}
    for name in option.models:
        spec = MODELS[name]
        kwarg = spec.depth if option.kwarg == "depth" else option.kwarg
        if kwarg in spec.defaults:
            values[name] = spec.defaults[kwarg]
    if not values:
        return None
    if len(set(values.values())) == 1 and len(values) == len(option.models):
        return str(next(iter(values.values())))
    return ", ".join(f"{name} {value}" for name, value in values.items())


def cli_kwargs(name: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Builder keywords of model ``name`` from parsed command-line ``values`` (by ``dest``).

    Options left unset (``None``, or a switch not given) and options ``name`` does not read
    are left out, so the builder's defaults apply.
    """
    spec = MODELS[name]
    kwargs: dict[str, Any] = {}
    for option in OPTIONS:
        given = values.get(option.dest)
        if name not in option.models or given is None or given is False:
            continue
        kwarg = spec.depth if option.kwarg == "depth" else option.kwarg
        kwargs[kwarg] = option.value if option.value is not None else given
    return kwargs


def conditional_kwargs(data: Dataset) -> dict[str, Any]:
    """The builder keywords that condition a model on what ``data`` carries.

    ``context_features=C`` for data with a float context (``data.train_context``, ``(N, C)``),
    else ``num_classes=K`` for data with class labels (``K`` = the largest label + 1). The
    keywords are recorded with the others in a checkpoint, so :func:`load_model` rebuilds
    the conditional model.

    Raises:
        ValueError: the data have neither a context nor labels.

    Example:
        >>> from flows import data
        >>> conditional_kwargs(data.load("digits"))
        {'num_classes': 10}
    """
    if data.context_features is not None:
        return {"context_features": data.context_features}
    if data.num_classes is not None and data.num_classes >= 2:
        return {"num_classes": data.num_classes}
    raise ValueError(f"{data.name} has no class labels or context to condition on")


def build_model(name: str, input_shape: Sequence[int], **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a key of :data:`MODELS` (``glow``, ``realnvp``, ``iresnet``).
        input_shape: the event shape, ``(C, H, W)`` or ``(D,)``.
        **kwargs: builder arguments (``levels``, ``steps``, ``hidden_channels``,
            ``n_levels``, ...), passed as given: ``logit_alpha=None`` is a model without a
            Logit, not the builder's default (leave an argument out for that).

    Returns:
        The :class:`~flows.models.Flow`.

    Raises:
        ValueError: an unknown name, or arguments the builder rejects.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name].build()(tuple(input_shape), **kwargs)


VARIATIONAL_MODEL = "model.pt"
"""The file a variational run (``flows train --objective reverse-kl ...``) writes: ``model``, its
weights, and ``config``, the model config (``model``, ``input_shape``, ``kwargs``, ``defaults``)
with the ``target`` it was fitted to. It has no optimiser state: such a run does not resume."""


def model_file(path: str | os.PathLike[str]) -> Path:
    """The file :func:`load_model` reads for ``path``: the file itself, else the run directory's
    ``checkpoint.pt``, or the :data:`VARIATIONAL_MODEL` of a variational run's directory."""
    from flows.training import checkpoint_file

    file = checkpoint_file(path)
    variational = Path(path) / VARIATIONAL_MODEL
    return variational if Path(path).is_dir() and not file.exists() and variational.is_file() else file


def config_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The builder keywords a recorded model config builds with: those it records, over the
    defaults its left-out options had when it was written (:func:`legacy_defaults`); in a
    config from before :data:`NONE_KEPT_SINCE` a recorded ``None`` built the default, and still does."""
    version = config.get("defaults", 1)
    recorded = config.get("kwargs", {})
    if version < NONE_KEPT_SINCE:
        recorded = {key: value for key, value in recorded.items() if value is not None}
    return {**legacy_defaults(config["model"], version), **recorded}


def load_model(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by ``flows train``.

    Args:
        path: the checkpoint file or its run directory; or a variational run's
            :data:`VARIATIONAL_MODEL` or its directory.
        map_location: where to put the tensors.

    Returns:
        ``(model, checkpoint)``, the model in eval mode with the trained weights (a variational
        run's checkpoint holds only ``model`` and ``config``).

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        flows.io.CheckpointError: the file is corrupted, no flows checkpoint, or its
            weights do not fit the model its config describes.
    """
    from flows.io import CheckpointError, load_verified
    from flows.training import load_checkpoint, load_weights

    file = model_file(path)
    state = load_verified(file) if file.name == VARIATIONAL_MODEL else load_checkpoint(file)
    config = state.get("config") or {}
    if "model" not in config or config["model"] not in MODELS:
        raise CheckpointError(file, "the checkpoint does not record which registered model it holds")
    if "input_shape" not in config:
        raise CheckpointError(
            file,
            f"records no input shape (a variational run's model.pt from before flows recorded it); rebuild it "
            f"with flows.models.build_model({config['model']!r}, (target dimension,), **config['kwargs']) and "
            "load_state_dict(state['model'])",
        )
    kwargs = config_kwargs(config)
    try:
        model = build_model(config["model"], config["input_shape"], **kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(file, f"its model config {config} does not build: {error}") from None
    load_weights(model, state["model"], file)
    model.to(map_location)
    model.eval()
    return model, state
