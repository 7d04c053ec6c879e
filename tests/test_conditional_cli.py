"""Conditional training, evaluation, resume and the command line (``--conditional``, ``--class``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flows import data as datasets
from flows.cli import main
from flows.data.streaming import example_seed, prepare_examples
from flows.models import Glow, RealNVP, load_model
from flows.models.context import ClassEmbedding
from flows.models.registry import conditional_kwargs
from flows.training import TrainConfig, context_source, evaluate, train

TINY = ["--levels", "1", "-K", "1", "--hidden", "8", "--batch", "16", "--no-progress"]
FAST = {"progress": False, "eval_batch_size": 512, "init_batch_size": 128}


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.load("digits")


@pytest.fixture(scope="module")
def posterior() -> datasets.Dataset:
    return datasets.load("gaussian-linear", n_train=256, n_test=64)


def _train_argv(out: Path, steps: int, *extra: str) -> list[str]:
    argv = ["train", "--model", "glow", "--data", "digits", "--conditional", "--steps", str(steps)]
    return [*argv, "--eval-every", "2", *TINY, *extra, "--out", str(out)]


# ----------------------------------------------------------------------------- library


def test_context_source(digits: datasets.Dataset, posterior: datasets.Dataset) -> None:
    torch.manual_seed(0)
    assert context_source(Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8), digits) is None
    classes = Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, num_classes=10)
    assert context_source(classes, digits) == "labels"
    vectors = RealNVP((5,), levels=1, steps=1, hidden_channels=8, context_features=5)
    assert context_source(vectors, posterior) == "context"
    with pytest.raises(ValueError, match="class-conditional but 'gaussian-linear' has no class labels"):
        context_source(Glow((5,), levels=1, steps=1, hidden_channels=8, num_classes=3), posterior)
    with pytest.raises(ValueError, match="conditional but 'digits' has no context"):
        context_source(Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, context_features=2), digits)
    with pytest.raises(ValueError, match="labels up to 9 but the model has 5 classes"):
        context_source(Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, num_classes=5), digits)
    assert conditional_kwargs(digits) == {"num_classes": 10}
    assert conditional_kwargs(posterior) == {"context_features": 5}


def test_evaluate_conditions_on_the_context(digits: datasets.Dataset, posterior: datasets.Dataset) -> None:
    torch.manual_seed(0)
    model = RealNVP((5,), levels=1, steps=2, hidden_channels=8, context_features=5)
    train(model, posterior, TrainConfig(steps=3, batch_size=32, **FAST))
    model.eval()
    with torch.no_grad():
        expected = -model.log_prob(posterior.test, posterior.test_context).double().mean().item()
        shuffled = -model.log_prob(posterior.test, posterior.test_context.flip(0)).double().mean().item()
    assert evaluate(model, posterior, batch_size=16) == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(shuffled)

    torch.manual_seed(0)
    glow = Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, num_classes=10, n_levels=17)
    train(glow, digits, TrainConfig(steps=2, batch_size=32, **FAST))
    glow.eval()
    x = prepare_examples(digits, digits.test, [example_seed(0, i) for i in range(len(digits.test))])
    with torch.no_grad():
        bpd = glow.bits_per_dim(x, digits.test_labels).double().mean().item()
    assert evaluate(glow, digits, batch_size=len(digits.test)) == pytest.approx(bpd, rel=1e-6)


def test_conditional_resume_continues_bit_identically(posterior: datasets.Dataset, tmp_path: Path) -> None:
    kwargs = {"batch_size": 32, "lr": 5e-3, "warmup": 2, "eval_every": 3, **FAST}

    def model(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return RealNVP((5,), levels=1, steps=2, hidden_channels=8, context_features=5)

    whole = model(0)
    full = train(whole, posterior, TrainConfig(steps=7, out_dir=tmp_path / "a", **kwargs))
    train(model(0), posterior, TrainConfig(steps=3, out_dir=tmp_path / "b", **kwargs))
    second = model(99)
    resumed = train(second, posterior, TrainConfig(steps=7, out_dir=tmp_path / "b", resume=True, **kwargs))
    assert resumed["train"] == full["train"] and resumed["final_test"] == full["final_test"]
    for (name, a), b in zip(whole.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_train_refuses_data_without_the_context(tmp_path: Path) -> None:
    moons = datasets.load("moons", n_train=64, n_test=16)
    torch.manual_seed(0)
    model = Glow((2,), levels=1, steps=1, hidden_channels=8, context_features=1)
    with pytest.raises(ValueError, match="conditional but 'moons' has no context"):
        train(model, moons, TrainConfig(steps=1, batch_size=8, out_dir=tmp_path, **FAST))
    assert not (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- command line


def test_cli_class_conditional_digits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(_train_argv(out, 2)) == 0
    assert "test bits/dim:" in capsys.readouterr().out
    for name in ("checkpoint.pt", "samples.png", "interpolation.png", "curve.png"):
        assert (out / name).stat().st_size > 0, name
    model, state = load_model(out)
    assert state["config"]["kwargs"]["num_classes"] == 10 and state["data"]["context"] == "labels"
    assert model.conditional and isinstance(model.embedding, ClassEmbedding)
    assert model.sample(3, context=torch.tensor([0, 4, 9])).shape == (3, 1, 8, 8)

    assert main(["sample", str(out), "--class", "3", "--n", "3", "--out", str(tmp_path / "three.png")]) == 0
    assert (tmp_path / "three.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["sample", str(out), "--n", "2", "--temperatures", "0.7", "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["interpolate", str(out), "--pairs", "2", "--steps", "3", "--out", str(tmp_path / "i.png")]) == 0
    capsys.readouterr()

    assert main(["sample", str(out), "--class", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flows sample: error: --class 10: the model has 10 classes, numbered 0 to 9"


def test_cli_conditional_resume_is_bit_identical(tmp_path: Path) -> None:
    assert main(_train_argv(tmp_path / "whole", 4)) == 0
    assert main(_train_argv(tmp_path / "split", 2)) == 0
    assert main([*_train_argv(tmp_path / "split", 4), "--resume"]) == 0
    whole = json.loads((tmp_path / "whole" / "history.json").read_text())
    split = json.loads((tmp_path / "split" / "history.json").read_text())
    assert split["train"] == whole["train"] and split["test"] == whole["test"]
    a, _ = load_model(tmp_path / "whole")
    b, _ = load_model(tmp_path / "split")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_cli_class_on_an_unconditional_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "plain"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "1", "--eval-every", "1", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--class", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flows sample: error: --class 3:")
    assert "unconditional model" in err[0] and "--conditional" in err[0]


def test_cli_conditional_without_labels_or_context(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--data", "moons", "--conditional", "--steps", "1", *TINY, "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "flows train: error: --conditional: moons has no class labels or context to condition on; "
        "drop --conditional or choose other data"
    ]
    assert not (tmp_path / "m" / "checkpoint.pt").exists()


def test_cli_rotated_moons_density_and_gap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rotated"
    argv = ["train", "--model", "realnvp", "--data", "rotated-moons", "--conditional", "--n-train", "256"]
    argv += ["--n-test", "128", "--steps", "2", "--eval-every", "2", *TINY, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test KL to the true p(x | c)" in printed
    assert (out / "density.png").is_file()
    model, state = load_model(out)
    assert state["config"]["kwargs"]["context_features"] == 1 and model.conditional
    assert main(["sample", str(out), "--out", str(tmp_path / "d.png")]) == 0
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["sample", str(out), "--class", "1"]) == 2
    assert "float context vectors" in capsys.readouterr().err


def test_cli_gaussian_linear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "posterior"
    argv = ["train", "--model", "glow", "--data", "gaussian-linear", "--conditional", "--n-train", "256"]
    argv += ["--n-test", "64", "--steps", "2", "--eval-every", "2", *TINY, "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    nll = float(printed.split("test NLL (nats): ")[1].split()[0])
    gap = float(printed.split("E[log p - log q]: ")[1].split()[0])
    data = datasets.load("gaussian-linear", n_train=256, n_test=64)
    truth = datasets.gaussian_linear_log_posterior(data.test.double(), data.test_context.double()).mean().item()
    assert gap == pytest.approx(nll + truth, abs=2e-4)
    _, state = load_model(out)
    assert state["config"]["kwargs"]["context_features"] == 5


@pytest.mark.parametrize(
    ("model", "data", "extra"),
    [
        ("nsf", "moons", ["--bins", "4"]),
        ("maf", "gaussian-linear", ["--conditional", "--transform", "spline", "--bins", "4"]),
    ],
)
def test_vector_flows_train_and_reload_from_the_command_line(
    model: str, data: str, extra: list[str], tmp_path: Path
) -> None:
    out = tmp_path / model
    argv = ["train", "--model", model, "--data", data, "--steps", "4", "-K", "2", "--hidden", "8"]
    assert main([*argv, "--batch", "16", "--no-progress", *extra, "--out", str(out)]) == 0
    rebuilt, state = load_model(out)
    assert type(rebuilt).__name__ == "Flow" and state["step"] == 4
    assert rebuilt.conditional == ("--conditional" in extra)
