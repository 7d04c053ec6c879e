"""Training loop, checkpoints, exact resume, non-finite losses, and the command line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from flows import data as datasets
from flows.cli import main
from flows.io import atomic_path
from flows.models import Glow, load_model
from flows.training import NonFiniteLossError, TrainConfig, evaluate, initialize, load_checkpoint, train
from flows.transforms import Logit, ResidualBlock


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.load("digits")


@pytest.fixture(scope="module")
def moons() -> datasets.Dataset:
    return datasets.load("moons", n_train=512, n_test=256)


def tiny_glow(shape: tuple[int, ...], n_levels: int = 17, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Glow(shape, levels=1, steps=2, hidden_channels=8, n_levels=n_levels)


FAST = {"progress": False, "eval_batch_size": 512, "init_batch_size": 256}


def fit(model: nn.Module, data: datasets.Dataset, **settings) -> dict:
    return train(model, data, TrainConfig(**{**FAST, **settings}))


def test_training_lowers_loss(digits: datasets.Dataset) -> None:
    model = tiny_glow((1, 8, 8))
    initialize(model, digits.prepare(digits.train[:256]))
    before = evaluate(model, digits)
    history = fit(model, digits, steps=30, batch_size=32, lr=1e-2, warmup=5, eval_every=30)
    assert history["metric"] == "bits/dim"
    assert len(history["train"]) == 30 and history["step"] == list(range(1, 31))
    assert history["test_step"] == [30]
    assert history["final_test"] == history["test"][-1] < before
    assert sum(history["train"][-5:]) < sum(history["train"][:5])
    # Warm-up ramps the learning rate linearly to its target.
    assert history["lr"][0] == pytest.approx(1e-2 / 5) and history["lr"][-1] == pytest.approx(1e-2)


def test_training_2d_reports_nll(moons: datasets.Dataset) -> None:
    model = tiny_glow((2,))
    history = fit(model, moons, steps=25, batch_size=64, lr=1e-2, warmup=0, eval_every=25)
    assert history["metric"] == "nll"
    assert history["final_test"] == pytest.approx(evaluate(model, moons))
    assert sum(history["train"][-5:]) < sum(history["train"][:5])


def test_evaluate_leaves_global_rng_alone(digits: datasets.Dataset) -> None:
    model = tiny_glow((1, 8, 8))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate(model, digits)
    assert torch.equal(torch.rand(3), expected)
    assert evaluate(model, digits) == first  # seeded dequantization noise


def test_checkpoint_round_trip_gives_identical_log_prob(
    digits: datasets.Dataset, tmp_path: Path
) -> None:
    model = tiny_glow((1, 8, 8))
    config = {
        "model": "glow",
        "input_shape": [1, 8, 8],
        "kwargs": {"levels": 1, "steps": 2, "hidden_channels": 8, "n_levels": 17},
        "data": {"name": "digits"},
    }
    fit(model, digits, steps=6, batch_size=32, eval_every=3, out_dir=tmp_path, metadata=config)
    state = load_checkpoint(tmp_path)
    assert state["step"] == 6 and state["config"] == config
    assert state["data"] == {"name": "digits", "shape": [1, 8, 8], "n_levels": 17, "context": None}
    assert (tmp_path / "history.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    rebuilt, _ = load_model(tmp_path)
    x = digits.prepare(digits.test[:16], generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.log_prob(x), rebuilt.log_prob(x))


def test_resume_continues_bit_identically(digits: datasets.Dataset, tmp_path: Path) -> None:
    kwargs = {"batch_size": 32, "lr": 5e-3, "warmup": 3, "eval_every": 3}
    whole = tiny_glow((1, 8, 8))
    full = fit(whole, digits, steps=8, out_dir=tmp_path / "a", **kwargs)

    first = tiny_glow((1, 8, 8))
    fit(first, digits, steps=4, out_dir=tmp_path / "b", **kwargs)
    # A fresh model with other weights: everything must come from the checkpoint.
    second = tiny_glow((1, 8, 8), seed=99)
    torch.manual_seed(12345)  # a resumed run restores the global random state too
    resumed = fit(second, digits, steps=8, out_dir=tmp_path / "b", resume=True, **kwargs)

    assert resumed["step"] == full["step"]
    assert resumed["train"] == full["train"]  # exact floats, not approximate
    assert resumed["grad_norm"] == full["grad_norm"]
    assert resumed["final_test"] == full["final_test"]
    for (name, a), b in zip(whole.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_needs_a_checkpoint(digits: datasets.Dataset, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(tiny_glow((1, 8, 8)), digits, steps=2, out_dir=tmp_path, resume=True)


class Poisoned(nn.Module):
    """Wraps a flow; its log-density turns NaN from the ``nan_at``-th training step on."""

    def __init__(self, flow: nn.Module, nan_at: int) -> None:
        super().__init__()
        self.flow, self.nan_at, self.calls = flow, nan_at, 0

    def log_prob(self, x: Tensor) -> Tensor:
        out = self.flow.log_prob(x)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls >= self.nan_at:
                out = out * math.nan
        return out


def test_non_finite_loss_rolls_back_past_the_weights_that_produced_it(
    moons: datasets.Dataset, tmp_path: Path
) -> None:
    # The loss of step 5 is a function of the weights after step 4: the step-4 checkpoint
    # would fail again on resume whatever the learning rate, so step 2's is restored.
    model = Poisoned(tiny_glow((2,)), nan_at=5)
    with pytest.raises(NonFiniteLossError) as info:
        fit(model, moons, steps=10, batch_size=32, eval_every=2, out_dir=tmp_path)
    message = str(info.value)
    assert "non-finite loss" in message and "step 5" in message
    assert "checkpoint.pt (step 2) is intact" in message and "checkpoint.diverged.pt" in message
    assert info.value.step == 5 and info.value.checkpoint_step == 2
    assert load_checkpoint(tmp_path / "checkpoint.diverged.pt")["step"] == 4
    state = load_checkpoint(tmp_path)
    assert state["step"] == 2 and len(state["history"]["train"]) == 2
    assert all(math.isfinite(v) for v in state["history"]["train"])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_loss_keeps_an_earlier_checkpoint(moons: datasets.Dataset, tmp_path: Path) -> None:
    # Step 4's checkpoint gave a finite loss at step 5: it is good for a NaN at step 6.
    model = Poisoned(tiny_glow((2,)), nan_at=6)
    with pytest.raises(NonFiniteLossError, match=r"checkpoint.pt \(step 4\) is intact") as info:
        fit(model, moons, steps=10, batch_size=32, eval_every=2, out_dir=tmp_path)
    assert info.value.set_aside is None and not (tmp_path / "checkpoint.diverged.pt").exists()


def test_non_finite_loss_without_checkpoint(moons: datasets.Dataset) -> None:
    model = Poisoned(tiny_glow((2,)), nan_at=1)
    with pytest.raises(NonFiniteLossError, match="No good checkpoint remains") as info:
        fit(model, moons, steps=3, batch_size=32)
    assert info.value.checkpoint is None and "step None" not in str(info.value)


def test_atomic_path_keeps_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


# ----------------------------------------------------------------------------- command line

TINY = ["--levels", "1", "-K", "1", "--hidden", "8", "--batch", "16", "--no-progress"]


def test_cli_train_sample_interpolate_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "3", "--eval-every", "3"]
    assert main([*argv, *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test bits/dim:" in printed
    for name in ("checkpoint.pt", "history.json", "samples.png", "interpolation.png", "curve.png"):
        assert (out / name).stat().st_size > 0, name

    assert main(["sample", str(out), "--n", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["interpolate", str(out / "checkpoint.pt"), "--pairs", "2", "--steps", "3"]) == 0
    assert (out / "interpolation.png").is_file()

    argv[argv.index("--steps") + 1] = "5"
    assert main([*argv, *TINY, "--out", str(out), "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert load_checkpoint(out)["step"] == 5


def test_cli_iresnet_reports_exact_likelihood(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "iresnet"
    argv = ["train", "--model", "iresnet", "--data", "digits", "--steps", "2", "--eval-every", "2"]
    assert main([*argv, *TINY, "--downsampling", "haar", "--logdet", "unbiased", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test bits/dim, exact log-det:" in printed
    model, _ = load_model(out)
    assert {b.logdet_mode for b in model.modules() if isinstance(b, ResidualBlock)} == {"unbiased"}


@pytest.mark.parametrize(("flag", "has_logit"), [([], True), (["--logit-alpha", "0"], False)])
def test_cli_records_logit_preprocessing(tmp_path: Path, flag: list[str], has_logit: bool) -> None:
    out = tmp_path / "glow"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "1", "--eval-every", "1"]
    assert main([*argv, *TINY, *flag, "--out", str(out)]) == 0
    model, state = load_model(out)
    assert "logit_alpha" in state["config"]["kwargs"]
    assert any(isinstance(m, Logit) for m in model.modules()) == has_logit


def test_cli_2d_writes_density(tmp_path: Path) -> None:
    out = tmp_path / "moons"
    argv = [
        "train",
        "--model",
        "realnvp",
        "--data",
        "moons",
        "--n-train",
        "256",
        "--n-test",
        "128",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    assert (out / "density.png").is_file() and (out / "curve.png").is_file()
    assert main(["sample", str(out), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").is_file()


def test_cli_bad_data_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "train",
        "--data",
        "mnist",
        "--data-dir",
        str(tmp_path / "missing"),
        "--out",
        str(tmp_path / "run"),
        "--steps",
        "1",
        *TINY,
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "missing" in err
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "r"), *TINY]) == 1
    assert "unknown dataset" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "no-run")]) == 1
    assert "no checkpoint" in capsys.readouterr().err




def test_registry_defaults_match_the_builders() -> None:
    import inspect

    from flows.models.registry import MODELS, OPTIONS

    for name, spec in MODELS.items():
        signature = inspect.signature(spec.build()).parameters
        for kwarg, default in spec.defaults.items():
            assert signature[kwarg].default == default, (name, kwarg)
        assert spec.depth in signature
    for option in OPTIONS:
        for name in option.models:
            kwarg = MODELS[name].depth if option.kwarg == "depth" else option.kwarg
            assert kwarg in inspect.signature(MODELS[name].build()).parameters, (name, option.flags)
