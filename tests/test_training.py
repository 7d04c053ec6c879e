"""Training loop, checkpoints, exact resume, non-finite losses, and the command line."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from flows import data as datasets
from flows.cli import main
from flows.io import atomic_path
from flows.models import Glow, RealNVP, load_model
from flows.models.registry import DEFAULTS_VERSION
from flows.training import NonFiniteLossError, TrainConfig, evaluate, initialize, load_checkpoint, train
from flows.transforms import AffineCoupling, Logit, ResidualBlock


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
    data = {"name": "digits", "shape": [1, 8, 8], "n_levels": 17, "context": None, "sizes": [1497, 300]}
    assert state["data"] == data
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


def test_bits_per_dim_for_other_grey_levels_than_the_data_is_refused(digits: datasets.Dataset) -> None:
    model = Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8)  # n_levels=256, digits have 17
    with pytest.raises(ValueError, match="n_levels=256 grey levels but digits has 17; build it with n_levels=17"):
        fit(model, digits, steps=1)


def test_data_must_be_a_dataset() -> None:
    with pytest.raises(TypeError, match=r"flows.data.load\(name\) makes one\), got str"):
        train(tiny_glow((1, 8, 8)), "digits", TrainConfig(steps=1, progress=False))


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
    assert main(["train", "--data", "nope", "--out", str(tmp_path / "r"), *TINY]) == 2  # a usage error
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


# ------------------------------------------------------------------- keeping the best (issue 21)


def test_ema_update_is_the_exponential_average_and_copies_buffers() -> None:
    from flows.ema import EMA
    from flows.transforms import ActNorm

    norm = ActNorm(3)
    start = {k: v.clone() for k, v in norm.named_parameters()}
    ema = EMA(norm, decay=0.5)
    steps = [torch.randn(3) for _ in range(12)]
    for value in steps:
        with torch.no_grad():
            norm.bias.copy_(value)
        ema.update(norm)
    # The warm-up's decays 1/10, 2/11, ..., capped at 0.5 from update n = 8 ((1 + 8) / (10 + 8)) on.
    expected = start["bias"]
    for n, value in enumerate(steps):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
    torch.testing.assert_close(ema.average["bias"], expected, rtol=1e-6, atol=1e-7)
    assert ema.updates == 12 and ema.effective_decay == 0.5
    assert torch.equal(ema.average["log_scale"], start["log_scale"])  # never moved
    # Buffers are the model's state, copied: ActNorm's flag is never "averaged" to 0.5.
    norm.initialized.fill_(True)
    assert ema.state_dict(norm)["initialized"].item() is True
    raw = norm.bias.detach().clone()
    with ema.applied(norm):
        assert torch.equal(norm.bias, ema.average["bias"])
    assert torch.equal(norm.bias, raw)  # restored bit for bit
    with pytest.raises(ValueError, match="decay must be a number in"):
        EMA(norm, decay=1.0)


@pytest.mark.parametrize("decay", [0.999, 0.9999])
def test_ema_warm_up_leaves_the_initialisation_behind(decay: float) -> None:
    from flows.ema import EMA

    # Weights at 0 when the average starts, then at 1 for n updates. A fixed decay d would
    # leave d^n of the start in the average; the warm-up leaves prod_{j<n} (1 + j) / (10 + j)
    # = n! 9! / (n + 9)! = 1 / C(n + 9, 9) (while (1 + j) / (10 + j) <= d, j < 8990 here).
    layer = nn.Linear(1, 1, bias=False).double()
    nn.init.zeros_(layer.weight)
    ema = EMA(layer, decay)
    nn.init.ones_(layer.weight)
    for n in range(1, 41):
        ema.update(layer)
        left = 1 - ema.average["weight"].item()
        assert left == pytest.approx(1 / math.comb(n + 9, 9), rel=1e-9, abs=1e-15), n
    # 40 updates: 4.9e-10 of the start is left, against 0.96 (0.999) without the warm-up.
    assert left < 1e-9 and decay**40 > 0.96
    # A restored count resumes the warm-up where it was; past it the decay is d itself.
    restored = EMA(layer, decay)
    restored.load_state_dict(ema.state_dict(layer), updates=100)
    assert restored.effective_decay == 101 / 110 and torch.equal(restored.average["weight"], ema.average["weight"])
    restored.load_state_dict(ema.state_dict(layer), updates=90_000)
    assert restored.effective_decay == decay and restored.updates == 90_000
    with pytest.raises(ValueError, match="updates must be an integer >= 0"):
        restored.load_state_dict(ema.state_dict(layer), updates=-1)


def test_schedule_values() -> None:
    from flows.training import _Schedule

    constant, cosine = _Schedule(4), _Schedule(4, "cosine", steps=14)
    assert [constant(k) for k in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert [cosine(k) for k in (0, 3)] == [0.25, 1.0]  # the same warm-up
    assert cosine(4) == 1.0 and cosine(9) == pytest.approx(0.5) and cosine(14) == pytest.approx(0.0)
    assert 0 < cosine(13) < 0.03  # the last step (k = steps - 1) still moves


def test_cosine_run_records_its_learning_rates(moons: datasets.Dataset) -> None:
    history = fit(tiny_glow((2,)), moons, steps=10, batch_size=32, lr=1e-2, warmup=2, schedule="cosine", eval_every=10)
    # Warm-up over steps 1-2, then the cosine from 1 (step 3) over the 8 steps left.
    expected = [1e-2 * f for f in (0.5, 1.0)] + [1e-2 * 0.5 * (1 + math.cos(math.pi * j / 8)) for j in range(8)]
    assert history["lr"] == pytest.approx(expected)


def test_validation_split_is_fixed_and_disjoint() -> None:
    from flows.training import _split

    config = TrainConfig(steps=1, validation=0.25, seed=3)
    fit_idx, val_idx = _split(100, config)
    assert len(val_idx) == 25 and len(fit_idx) == 75
    assert sorted(torch.cat([fit_idx, val_idx]).tolist()) == list(range(100))
    again = _split(100, TrainConfig(steps=1, validation=0.25, seed=3, batch_size=8))
    assert torch.equal(again[1], val_idx)  # the seed alone decides
    assert not torch.equal(_split(100, TrainConfig(steps=1, validation=0.25, seed=4))[1], val_idx)
    assert len(_split(100, TrainConfig(steps=1, validation=7))[1]) == 7
    assert len(_split(100, TrainConfig(steps=1, validation=0))[1]) == 0
    with pytest.raises(ValueError, match="validation must be a fraction"):
        TrainConfig(steps=1, validation=1.5)
    with pytest.raises(ValueError, match="leaves none of the 100"):
        TrainConfig(steps=1, validation=100).validation_size(100)


def test_best_checkpoint_picks_the_step_before_validation_worsens(
    moons: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.training

    # Validation scores of the raw weights at the evaluations of steps 2, 4, 6, 8: best at 4.
    scripted = iter([3.0, 2.0, 2.5, 2.8])
    real = flows.training.evaluate

    def scored(model, data, split="test", batch_size=500, seed=0, rows=None):  # noqa: ANN001, ANN202
        value = real(model, data, split, batch_size, seed, rows)
        return next(scripted) if rows is not None else value

    monkeypatch.setattr(flows.training, "evaluate", scored)
    history = fit(tiny_glow((2,)), moons, steps=8, batch_size=32, eval_every=2, out_dir=tmp_path / "long")
    assert history["validation"] == [3.0, 2.0, 2.5, 2.8] and history["test_step"] == [2, 4, 6, 8]
    assert history["best"] == {"step": 4, "weights": "raw", "validation": 2.0, "test": history["test"][1]}
    best = load_checkpoint(tmp_path / "long" / "best.pt")
    assert best["step"] == 4 and best["best"]["weights"] == "raw" and best["best"]["metric"] == "nll"
    monkeypatch.setattr(flows.training, "evaluate", real)
    fit(tiny_glow((2,)), moons, steps=4, batch_size=32, eval_every=2, out_dir=tmp_path / "short")
    for name, weight in load_checkpoint(tmp_path / "short")["model"].items():
        assert torch.equal(best["model"][name], weight), name  # the weights of step 4 exactly


def test_ema_is_evaluated_checkpointed_and_can_be_the_best(digits: datasets.Dataset, tmp_path: Path) -> None:
    history = fit(
        tiny_glow((1, 8, 8)), digits, steps=6, batch_size=32, lr=5e-3, eval_every=2, ema_decay=0.5, out_dir=tmp_path
    )
    assert len(history["test_ema"]) == len(history["validation_ema"]) == len(history["validation"]) == 3
    scores = {(s, "raw"): v for s, v in zip(history["test_step"], history["validation"])}
    scores.update({(s, "ema"): v for s, v in zip(history["test_step"], history["validation_ema"])})
    (step, kind), value = min(scores.items(), key=lambda item: item[1])
    test = history["test" if kind == "raw" else "test_ema"][history["test_step"].index(step)]
    assert history["best"] == {"step": step, "weights": kind, "validation": value, "test": test}
    state = load_checkpoint(tmp_path)
    assert set(state["ema"]) == set(state["model"])
    assert state["ema"]["bijector.blocks.2.bijector.blocks.0.initialized"].item() is True
    assert not torch.equal(state["ema"]["bijector.blocks.2.bijector.blocks.0.bias"],
                           state["model"]["bijector.blocks.2.bijector.blocks.0.bias"])


def test_resume_with_ema_reproduces_the_uninterrupted_run(digits: datasets.Dataset, tmp_path: Path) -> None:
    kwargs = {"batch_size": 32, "lr": 5e-3, "warmup": 2, "eval_every": 3, "ema_decay": 0.8, "schedule": "cosine"}
    full = fit(tiny_glow((1, 8, 8)), digits, steps=8, out_dir=tmp_path / "a", **kwargs)
    # A run of the same 8-step cosine killed after step 4: its checkpoint of step 4 is the previous one.
    run = tmp_path / "b"
    fit(tiny_glow((1, 8, 8)), digits, steps=8, out_dir=run, checkpoint_every=4, **kwargs)
    (run / "checkpoint.prev.pt").replace(run / "checkpoint.pt")
    assert load_checkpoint(run)["step"] == 4
    # A fresh model with other weights: everything, the average included, comes from the checkpoint.
    second = tiny_glow((1, 8, 8), seed=99)
    resumed = fit(second, digits, steps=8, out_dir=run, checkpoint_every=4, resume=True, **kwargs)
    assert resumed["train"] == full["train"] and resumed["lr"] == full["lr"]
    assert resumed["test_ema"] == full["test_ema"] and resumed["validation_ema"] == full["validation_ema"]
    assert resumed["best"] == full["best"]
    for name, value in load_checkpoint(tmp_path / "a")["ema"].items():
        assert torch.equal(load_checkpoint(run)["ema"][name], value), name
    assert load_checkpoint(run)["ema_updates"] == 8  # the warm-up went on where it was


def test_cli_flags_best_weights_and_their_provenance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "4", "--eval-every", "2", *TINY]
    flags = ["--validation", "200", "--ema", "0.5", "--schedule", "cosine", "--weight-decay", "0.01"]
    assert main([*argv, *flags, "--eval-batch", "64", "--init-batch", "96", "--init-micro-batch", "32",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    state = load_checkpoint(out)
    assert state["train"]["validation"] == 200 and state["train"]["ema_decay"] == 0.5
    assert state["train"]["schedule"] == "cosine" and state["train"]["weight_decay"] == 0.01
    assert state["optimizer"]["param_groups"][0]["decoupled_weight_decay"] is True
    best = state["history"]["best"]
    kind = "moving-average" if best["weights"] == "ema" else "raw"

    # Default: best.pt, named with its step and which weights it holds.
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line == (
        f"weights: the {kind} weights of step {best['step']}, best validation bits/dim "
        f"{best['validation']:.4f} (test {best['test']:.4f}), from {out / 'best.pt'}"
    )
    assert main(["sample", str(out), "--weights", "ema", "--n", "2", "--out", str(tmp_path / "e.png")]) == 0
    printed = capsys.readouterr().out
    average = "weights: the moving average (decay 0.5) of the weights at step 4"
    assert printed.startswith(f"{average}, from {out / 'checkpoint.pt'}")
    assert main(["interpolate", str(out), "--weights", "last", "--pairs", "1", "--steps", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"weights: the raw weights of step 4, from {out / 'checkpoint.pt'}")

    # Resuming keeps the checkpoint's settings; a different split is one line naming the fix.
    assert main([*argv, "--out", str(out), "--resume", "--steps", "6"]) == 0
    assert load_checkpoint(out)["train"]["ema_decay"] == 0.5
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--resume", "--steps", "8", "--validation", "0.2"]) == 2
    assert "the run holds out --validation 200" in capsys.readouterr().err


def test_cli_train_draws_its_figures_from_best_pt(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.figures
    import flows.training

    # Validation scores of the raw weights at steps 2 and 4: the weights of step 2 are the best.
    scripted = iter([2.0, 3.0])
    real_evaluate, real_samples = flows.training.evaluate, flows.figures.save_samples

    def scored(model, data, split="test", batch_size=500, seed=0, rows=None):  # noqa: ANN001, ANN202
        value = real_evaluate(model, data, split, batch_size, seed, rows)
        return next(scripted) if rows is not None else value

    drawn = []

    def samples(model, path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        drawn.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_samples(model, path, *args, **kwargs)

    monkeypatch.setattr(flows.training, "evaluate", scored)
    monkeypatch.setattr(flows.figures, "save_samples", samples)
    out = tmp_path / "run"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "4", "--eval-every", "2", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == 2 and best["best"]["weights"] == "raw"
    printed = capsys.readouterr().out.splitlines()
    figures = printed.index(
        f"figures: the raw weights of step 2, best validation bits/dim 2.0000 (test {best['best']['test']:.4f}), "
        f"from {out / 'best.pt'}"
    )
    assert printed[figures + 1] == f"wrote {out / 'samples.png'}"
    assert best["best"]["test"] == load_checkpoint(out)["history"]["test"][0]  # the test score of step 2
    (weights,) = drawn
    assert all(torch.equal(weights[k], v) for k, v in best["model"].items())  # not the weights of step 4
    assert any(not torch.equal(weights[k], v) for k, v in load_checkpoint(out)["model"].items())


def test_cli_old_run_without_best_or_ema(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "old"
    argv = ["train", "--model", "glow", "--data", "digits", "--steps", "2", "--eval-every", "2", *TINY]
    assert main([*argv, "--validation", "0", "--out", str(out)]) == 0
    assert not (out / "best.pt").exists()
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert capsys.readouterr().out.startswith("weights: the raw weights of step 2")
    for weights, problem in (("best", "no best.pt beside"), ("ema", "was trained without --ema")):
        assert main(["sample", str(out), "--weights", weights]) == 2
        err = capsys.readouterr().err
        assert problem in err and len(err.strip().splitlines()) == 1


def test_checkpoint_from_before_these_settings_resumes(digits: datasets.Dataset, tmp_path: Path) -> None:
    from flows.io import save_verified

    fit(tiny_glow((1, 8, 8)), digits, steps=2, batch_size=32, eval_every=2, validation=0, out_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    # What an older version wrote: Adam's L2 decay, no schedule, split or average, the old history.
    for key in ("schedule", "validation", "ema_decay", "decoupled_weight_decay", "ema_warmup"):
        del state["train"][key]
    for key in ("validation", "test_ema", "validation_ema", "best"):
        del state["history"][key]
    for group in state["optimizer"]["param_groups"]:
        # and the foreach update of the trainer before the fused one
        group.update(decoupled_weight_decay=False, foreach=True, fused=None)
    save_verified(state, tmp_path / "checkpoint.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: no "changed settings" warning
        history = fit(tiny_glow((1, 8, 8)), digits, steps=4, batch_size=32, eval_every=2, validation=0,
                      out_dir=tmp_path, resume=True)
    assert history["step"] == [1, 2, 3, 4] and history["best"] is None and history["validation"] == []
    (group,) = load_checkpoint(tmp_path)["optimizer"]["param_groups"]
    assert (group["fused"], group["foreach"]) == (True, None)  # the resumed run took this run's update


def test_checkpoint_from_before_the_ema_warm_up_resumes(digits: datasets.Dataset, tmp_path: Path) -> None:
    from flows.io import save_verified

    settings = {"batch_size": 32, "eval_every": 2, "ema_decay": 0.9, "out_dir": tmp_path}
    fit(tiny_glow((1, 8, 8)), digits, steps=2, **settings)
    state = load_checkpoint(tmp_path)
    assert state["ema_updates"] == 2 and state["train"]["ema_warmup"] is True
    # What the version without the warm-up wrote: the average alone, no count, no setting.
    del state["ema_updates"], state["train"]["ema_warmup"]
    save_verified(state, tmp_path / "checkpoint.pt")
    with pytest.warns(RuntimeWarning, match=r"ema_warmup: False -> True"):
        fit(tiny_glow((1, 8, 8)), digits, steps=3, resume=True, **settings)
    resumed = load_checkpoint(tmp_path)
    assert resumed["ema_updates"] == 3  # counted from the step: one update per step before
    assert resumed["history"]["test_ema"][:1] == state["history"]["test_ema"]


def test_bf16_precision_trains_the_networks_in_bf16(moons: datasets.Dataset) -> None:
    runs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = tiny_glow((2,))
        seen: list[torch.dtype] = []
        coupling = next(m for m in model.modules() if isinstance(m, AffineCoupling))
        coupling.conditioner.register_forward_hook(lambda m, i, out, seen=seen: seen.append(out.dtype))
        model.memory_saving = True  # the rebuild in backward runs the networks the same way
        history = fit(model, moons, steps=4, batch_size=64, warmup=0, eval_every=4, precision=precision)
        runs[precision] = history["train"]
        # Training steps (forward and rebuild) ran the network in bf16; evaluation in float32.
        assert (torch.bfloat16 in seen) == (precision == "bf16")
    assert all(math.isfinite(v) for v in runs["bf16"])
    assert runs["bf16"] != runs["fp32"]
    assert runs["bf16"] == pytest.approx(runs["fp32"], rel=0.05)


@pytest.mark.parametrize(("compile", "unit"), [(True, "step"), ("model", "model")])
def test_compile_compiles_the_regions_after_the_initialisation(
    moons: datasets.Dataset, monkeypatch, compile: bool | str, unit: str
) -> None:
    import flows.training as training
    from flows.compiling import compile_regions, regions

    calls = []

    def quick_backend(model, unit):  # the real function, on a backend that compiles in seconds
        calls.append((bool(model.bijector.leaves()[0].initialized), unit))  # ActNorm: initialised first
        return compile_regions(model, unit=unit, backend="aot_eager")

    monkeypatch.setattr(training, "compile_regions", quick_backend)
    model = tiny_glow((2,))
    history = fit(model, moons, steps=3, batch_size=64, warmup=0, eval_every=3, compile=compile)
    assert calls == [(True, unit)]
    assert all(block._compiled_call_impl is not None for block in regions(model, unit))
    assert all(math.isfinite(v) for v in history["train"])


@pytest.mark.parametrize(("flags", "unit"), [(["--compile"], "step"), (["--compile", "model"], "model")])
def test_cli_compile_reaches_the_trainer(tmp_path: Path, monkeypatch, flags: list[str], unit: str) -> None:
    import flows.training as training
    from flows.compiling import compile_regions

    seen = []

    def quick_backend(model, unit):  # the real function, on a backend that compiles in seconds
        seen.append(unit)
        return compile_regions(model, unit=unit, backend="eager")

    monkeypatch.setattr(training, "compile_regions", quick_backend)
    argv = ["train", "--data", "moons", "--model", "realnvp", "--levels", "1", "-K", "1", "--hidden", "8",
            "--steps", "2", "--eval-every", "2", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv + flags) == 0
    assert seen == [unit]


def test_cli_realnvp_coupling_spline_or_a_usage_line(tmp_path: Path, capsys) -> None:
    from flows.models.registry import load_model
    from flows.transforms import RationalQuadraticCoupling

    argv = ["train", "--data", "moons", "--model", "realnvp", "--levels", "1", "-K", "1", "--hidden", "8",
            "--steps", "1", "--eval-every", "1", "--no-progress"]
    assert main([*argv, "--coupling", "spline", "--out", str(tmp_path / "s")]) == 0
    model, _ = load_model(tmp_path / "s" / "checkpoint.pt")
    assert any(isinstance(m, RationalQuadraticCoupling) for m in model.modules())
    capsys.readouterr()
    assert main([*argv, "--coupling", "additive", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coupling must be one of ('affine', 'spline'), got 'additive'" in err[0]


def test_cli_compile_does_not_apply_to_variational_training(tmp_path: Path, capsys) -> None:
    argv = ["train", "--objective", "reverse-kl", "--target", "ring", "--compile", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile does not apply to --objective reverse-kl; drop it" in err[0]


def test_fp16_on_the_cpu_is_one_usage_line(tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", "moons", "--steps", "1", "--precision", "fp16", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fp16" in err[0] and "CUDA" in err[0]


def test_glow_without_split_prior_and_its_old_checkpoints_rebuild(tmp_path: Path) -> None:
    from flows.io import CheckpointError
    from flows.training import save_checkpoint

    run = tmp_path / "plain"
    args = ["train", "--model", "glow", "--data", "digits", "--levels", "2", "-K", "1", "--hidden", "8"]
    assert main([*args, "--steps", "1", "--no-split-prior", "--no-progress", "--out", str(run)]) == 0
    model, state = load_model(run)
    assert state["config"]["kwargs"]["split_prior"] is False
    with_prior = len(Glow((1, 8, 8), levels=2, steps=1, hidden_channels=8).state_dict())
    assert len(model.state_dict()) < with_prior
    # A run of the first defaults (split prior off unless asked for) recorded neither the
    # switch nor a defaults version: it still rebuilds without priors.
    state["config"].pop("defaults")
    state["config"]["kwargs"].pop("split_prior")
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    rebuilt, _ = load_model(run)
    torch.testing.assert_close(rebuilt.state_dict(), model.state_dict())
    # With today's defaults version the same config means a split prior: the weights do not fit.
    state["config"]["defaults"] = DEFAULTS_VERSION
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(run)


def test_conditional_nsf_checkpoints_of_the_mlp_conditioner_rebuild(tmp_path: Path) -> None:
    from flows.io import CheckpointError
    from flows.models import NSF
    from flows.training import save_checkpoint

    run = tmp_path / "posterior"
    args = ["train", "--model", "nsf", "--data", "gaussian-linear", "--conditional", "-K", "2", "--hidden", "8"]
    assert main([*args, "--steps", "1", "--no-progress", "--out", str(run)]) == 0
    _, state = load_model(run)
    assert state["config"]["defaults"] == DEFAULTS_VERSION
    # A run of defaults version 2 trained the MLP conditioner: its weights, under its version,
    # rebuild as that model; under today's version they do not fit the gated conditioner.
    config = state["config"]
    mlp = NSF(tuple(config["input_shape"]), **config["kwargs"], conditioner="mlp")
    state["model"], config["defaults"] = mlp.state_dict(), 2
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    rebuilt, _ = load_model(run)
    torch.testing.assert_close(rebuilt.state_dict(), mlp.state_dict())
    config["defaults"] = DEFAULTS_VERSION
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_model(run)


def test_maf_checkpoints_of_the_tanh_scale_rebuild_with_it(tmp_path: Path) -> None:
    from flows.models import MAF
    from flows.training import save_checkpoint
    from flows.transforms import MaskedAutoregressive

    def scales(model: nn.Module) -> set[str]:
        return {m.scale for m in model.modules() if isinstance(m, MaskedAutoregressive)}

    run = tmp_path / "maf"
    args = ["train", "--model", "maf", "--data", "moons", "-K", "2", "--hidden", "8"]
    assert main([*args, "--steps", "1", "--no-progress", "--out", str(run)]) == 0
    model, state = load_model(run)
    assert state["config"]["defaults"] == DEFAULTS_VERSION and scales(model) == {"softplus"}
    # A run of defaults version 3 trained exp(tanh a) scales, with the same parameter shapes:
    # under its version it rebuilds with that map, so its density is the one it trained.
    state["config"]["defaults"] = 3
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    rebuilt, _ = load_model(run)
    assert scales(rebuilt) == {"tanh"}
    assert main(["train", "--resume", "--out", str(run), "--steps", "2", "--no-progress"]) == 0
    resumed, _ = load_model(run)
    assert scales(resumed) == {"tanh"}  # --resume built the scale it trained, too
    config = state["config"]
    tanh = MAF(tuple(config["input_shape"]), **config["kwargs"], scale="tanh")
    tanh.load_state_dict(state["model"])
    x = torch.randn(5, 2)
    torch.testing.assert_close(rebuilt.log_prob(x), tanh.log_prob(x))
    assert not torch.allclose(model.log_prob(x), tanh.log_prob(x))


def test_logit_alpha_zero_trains_and_rebuilds_a_model_without_logit(tmp_path: Path) -> None:
    from flows.training import save_checkpoint

    def logits(model: nn.Module) -> int:
        return sum(isinstance(m, Logit) for m in model.modules())

    run = tmp_path / "realnvp"
    args = ["train", "--model", "realnvp", "--data", "digits", "--levels", "1", "-K", "1", "--hidden", "8"]
    args += ["--res-blocks", "1", "--logit-alpha", "0", "--steps", "1", "--no-progress", "--out", str(run)]
    assert main(args) == 0
    model, state = load_model(run)
    assert state["config"]["kwargs"]["logit_alpha"] is None and logits(model) == 0
    # Before defaults version 5 a recorded None was dropped and built the default Logit: such a
    # checkpoint (its weights those of the model with a Logit) still rebuilds the model it trained.
    config = state["config"]
    with_logit = RealNVP(tuple(config["input_shape"]), **{**config["kwargs"], "logit_alpha": 0.05})
    state["model"], config["defaults"] = with_logit.state_dict(), 4
    save_checkpoint(state, run / "checkpoint.pt", keep_previous=False)
    rebuilt, _ = load_model(run)
    assert logits(rebuilt) == 1
    torch.testing.assert_close(rebuilt.state_dict(), with_logit.state_dict())
    # --resume builds it the same way, and reads --logit-alpha against what was built.
    resume = ["train", "--resume", "--out", str(run), "--no-progress"]
    assert main([*resume, "--logit-alpha", "0", "--steps", "2"]) == 2
    assert main([*resume, "--logit-alpha", "0.05", "--steps", "2"]) == 0
    resumed, state = load_model(run)
    assert logits(resumed) == 1 and state["step"] == 2 and state["config"]["defaults"] == 4


def test_a_test_split_without_two_images_says_why_there_is_no_interpolation(tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--n-test", "1", "--levels", "1", "-K", "1", "--hidden", "8"]
    assert main([*argv, "--batch", "2", "--steps", "1", "--no-progress", "--workers", "0", "--out", str(out)]) == 0
    assert "no interpolation.png: the test split holds no two images to interpolate between" in capsys.readouterr().out
    assert not (out / "interpolation.png").exists() and (out / "samples.png").is_file()


def _three_lu_form(model: nn.Module, state: dict) -> None:
    """Rewrite a checkpoint as versions before the packed LU parameter wrote it: each LU
    1x1 convolution's ``lu_factors`` as ``lower``, ``upper`` and ``log_s`` (registered in
    that order), in the weights, the averages and Adam's state by parameter index."""
    from flows.transforms import InvConv1x1

    def split(value):
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return value.tril(-1), value.triu(1), value.diagonal().clone()
        return value, copy.deepcopy(value), copy.deepcopy(value)

    prefixes = [f"{n}." for n, m in model.named_modules() if isinstance(m, InvConv1x1) and m.lu]
    for weights in (state["model"], state["ema"]):
        for prefix in prefixes:
            parts = split(weights.pop(prefix + "lu_factors"))
            weights.update(zip([prefix + k for k in ("lower", "upper", "log_s")], parts))
    names = [n for n, _ in model.named_parameters()]
    old = {}
    for k, name in enumerate(names):
        entry = state["optimizer"]["state"].get(k)
        if not name.endswith("lu_factors"):
            old[len(old)] = entry
            continue
        parts = [{key: split(value)[i] for key, value in entry.items()} for i in range(3)]
        old.update({len(old) + i: part for i, part in enumerate(parts)})
    state["optimizer"]["state"] = old
    state["optimizer"]["param_groups"][0]["params"] = list(range(len(old)))


def test_checkpoint_with_three_lu_parameters_resumes_bit_identically(digits: datasets.Dataset, tmp_path: Path) -> None:
    """A run checkpointed before the 1x1 convolution's LU factors were one parameter resumes
    as if uninterrupted: its weights, averages and Adam moments are packed on load."""
    from flows.io import save_verified

    kwargs = {"batch_size": 32, "lr": 5e-3, "eval_every": 4, "ema_decay": 0.8}
    full = fit(tiny_glow((1, 8, 8)), digits, steps=8, out_dir=tmp_path / "a", **kwargs)
    run = tmp_path / "b"
    fit(tiny_glow((1, 8, 8)), digits, steps=8, out_dir=run, checkpoint_every=4, **kwargs)
    (run / "checkpoint.prev.pt").replace(run / "checkpoint.pt")
    state = load_checkpoint(run)
    model = tiny_glow((1, 8, 8))
    _three_lu_form(model, state)
    assert any(name.endswith(".lower") for name in state["model"])
    save_verified(state, run / "checkpoint.pt")
    second = tiny_glow((1, 8, 8), seed=99)
    resumed = fit(second, digits, steps=8, out_dir=run, checkpoint_every=4, resume=True, **kwargs)
    assert resumed["train"] == full["train"] and resumed["test_ema"] == full["test_ema"]
    final, reference = load_checkpoint(run), load_checkpoint(tmp_path / "a")
    for name, value in reference["model"].items():
        assert torch.equal(final["model"][name], value), name
    for name, value in reference["ema"].items():
        assert torch.equal(final["ema"][name], value), name


def test_checkpoint_with_three_lu_parameters_refuses_another_model(digits: datasets.Dataset, tmp_path: Path) -> None:
    """Resuming an old-form checkpoint into a deeper model names the mismatch as a
    checkpoint that does not fit (its weights are checked before its optimiser is packed)."""
    from flows.io import CheckpointError, save_verified

    run = tmp_path / "run"
    fit(tiny_glow((1, 8, 8)), digits, steps=4, out_dir=run, batch_size=32, checkpoint_every=4, ema_decay=0.8)
    state = load_checkpoint(run)
    _three_lu_form(tiny_glow((1, 8, 8)), state)
    save_verified(state, run / "checkpoint.pt")
    deeper = Glow((1, 8, 8), levels=1, steps=3, hidden_channels=8, n_levels=17)
    with pytest.raises(CheckpointError, match="do not fit"):
        fit(deeper, digits, steps=8, out_dir=run, batch_size=32, checkpoint_every=4, ema_decay=0.8, resume=True)


def test_a_nan_validation_score_is_never_the_best(digits: datasets.Dataset, tmp_path: Path, monkeypatch) -> None:
    """Weights whose validation score is NaN (a diverging run that still trains on finite
    losses) are never kept as ``best.pt``: they would draw NaN figures."""
    import flows.training

    monkeypatch.setattr(flows.training, "evaluate", lambda *args, **kwargs: float("nan"))
    history = fit(tiny_glow((1, 8, 8)), digits, steps=4, eval_every=2, validation=0.1, batch_size=32, out_dir=tmp_path)
    assert history["best"] is None and not (tmp_path / "best.pt").exists()
    assert all(math.isnan(v) for v in history["validation"])


def test_resuming_with_another_seed_is_refused_when_it_would_redraw_the_split(
    digits: datasets.Dataset, tmp_path: Path
) -> None:
    """The seed draws the validation split: a resumed run with another seed would validate on
    examples it trained on. Without a split, another seed only warns."""
    kwargs = {"batch_size": 32, "checkpoint_every": 2}
    split = {"out_dir": tmp_path / "split", "validation": 0.1, **kwargs}
    fit(tiny_glow((1, 8, 8)), digits, steps=2, seed=0, **split)
    with pytest.raises(ValueError, match=r"seed=1 differs from the checkpoint's \(0\).*validation split"):
        fit(tiny_glow((1, 8, 8)), digits, steps=4, seed=1, resume=True, **split)
    none = {"out_dir": tmp_path / "none", "validation": 0, **kwargs}
    fit(tiny_glow((1, 8, 8)), digits, steps=2, seed=0, **none)
    with pytest.warns(RuntimeWarning, match="without a validation split the seed only applies to a fresh start"):
        fit(tiny_glow((1, 8, 8)), digits, steps=4, seed=1, resume=True, **none)


def test_resuming_on_data_of_another_size_is_refused(tmp_path: Path) -> None:
    """The split and the batch order are drawn over the data's rows: resumed on a grown or
    shrunk dataset of the same name and shape, a run trained on rows it had held out."""
    moons = datasets.load("moons", n_train=400, n_test=100)
    kwargs = {"batch_size": 32, "checkpoint_every": 2, "out_dir": tmp_path}
    torch.manual_seed(0)
    fit(RealNVP((2,), levels=1, steps=2, hidden_channels=8), moons, steps=2, **kwargs)
    grown = datasets.load("moons", n_train=406, n_test=100)
    with pytest.raises(ValueError, match="400 training and 100 test examples; it now has 406 and 100"):
        fit(RealNVP((2,), levels=1, steps=2, hidden_channels=8), grown, steps=4, resume=True, **kwargs)


def test_a_nan_best_recorded_by_an_earlier_run_is_replaced(digits: datasets.Dataset, tmp_path: Path) -> None:
    from flows.io import save_verified

    kwargs = {"batch_size": 32, "eval_every": 2, "checkpoint_every": 2, "out_dir": tmp_path}
    fit(tiny_glow((1, 8, 8)), digits, steps=2, **kwargs)
    state = load_checkpoint(tmp_path)
    state["history"]["best"]["validation"] = float("nan")
    save_verified(state, tmp_path / "checkpoint.pt")
    history = fit(tiny_glow((1, 8, 8)), digits, steps=4, resume=True, **kwargs)
    assert math.isfinite(history["best"]["validation"]) and history["best"]["step"] == 4


def test_an_initialisation_batch_that_leaves_a_rank_nothing_is_refused(
    digits: datasets.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each initialisation micro-batch is sharded over the ranks: one of fewer examples than
    ranks left a rank an empty batch (its error) and the others waiting for it (a hang). The
    check runs on every rank before any collective; here the world of 2 is pretended."""
    from flows import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="last micro-batch of 1, fewer than the 2 processes"):
        fit(tiny_glow((1, 8, 8)), digits, steps=1, batch_size=32, init_batch_size=65, init_micro_batch_size=64)
