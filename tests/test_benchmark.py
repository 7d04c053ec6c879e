"""The step benchmark of ordinary vs memory-saving vs checkpointed backward (compiled and
in mixed precision too), and ``flows bench``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flows.benchmark import MODES, checkpointed, step_benchmark
from flows.cli import main
from flows.models import Glow
from flows.training import initialize


def small_glow(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Glow((1, 8, 8), levels=2, steps=2, hidden_channels=8)


def test_both_modes_measured_memory_saving_keeps_less() -> None:
    model = small_glow()
    x = torch.rand(8, 1, 8, 8)
    initialize(model, x)
    report = step_benchmark(model, x, repeats=2, warmup=1)
    assert [row.mode for row in report.rows] == list(MODES)
    for row in report.rows:
        assert row.wall_ms > 0 and row.cpu_ms is not None and row.cpu_ms >= 0
        assert row.peak_cuda_bytes is None  # CPU
    ordinary, saving, checkpoint = report.row("ordinary"), report.row("memory-saving"), report.row("checkpointed")
    assert 0 < saving.kept_bytes < checkpoint.kept_bytes < ordinary.kept_bytes
    assert all(row.first_step_s > 0 and not row.compiled and row.precision == "fp32" for row in report.rows)
    assert report.memory_ratio == saving.kept_bytes / ordinary.kept_bytes < 1
    assert report.time_ratio == pytest.approx(saving.wall_ms / ordinary.wall_ms)
    assert report.gradient_error < 1e-4  # float32
    printed = str(report)
    assert "| memory-saving |" in printed and "CPU ms" in printed and "peak CUDA" not in printed
    assert "gradient parity" in printed and "checkpointed / ordinary: time" in printed
    assert "compiled" not in printed and "bf16" not in printed


def test_users_model_and_random_state_left_unchanged() -> None:
    # Uninitialised ActNorm and memory-saving on: the copy is initialised and switched, not the model.
    model = small_glow()
    model.memory_saving = True
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    step_benchmark(model, torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)), repeats=1, warmup=0)
    assert torch.equal(torch.rand(3), expected)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.memory_saving is True
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("repeats", "warmup"), [(0, 1), (1, -1)], ids=["repeats-0", "warmup-negative"])
def test_bad_counts_rejected(repeats: int, warmup: int) -> None:
    with pytest.raises(ValueError, match="repeats|warmup"):
        step_benchmark(small_glow(), torch.rand(2, 1, 8, 8), repeats=repeats, warmup=warmup)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reports_peak_memory() -> None:
    model = small_glow().cuda()
    x = torch.rand(16, 1, 8, 8, device="cuda")
    initialize(model, x)
    report = step_benchmark(model, x, repeats=2, warmup=1)
    for row in report.rows:
        assert row.cpu_ms is None and row.peak_cuda_bytes is not None and row.peak_cuda_bytes > 0
    assert report.peak_ratio is not None and "peak CUDA MiB" in report.table()
    assert report.gradient_error < 1e-4


TINY = ["--model", "glow", "--data", "digits", "--levels", "2", "--steps-per-level", "1", "--hidden", "8"]


def test_cli_bench_prints_table(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", *TINY, "--batch", "8", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| mode | step ms (wall) | CPU ms | kept for backward (MiB) | first step (s) |" in printed
    assert "| ordinary |" in printed and "| memory-saving |" in printed and "| checkpointed |" in printed
    assert "memory-saving / ordinary: time" in printed and "gradient parity:" in printed
    assert "batch (8, 1, 8, 8)" in printed and f"torch {torch.__version__}" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0"], "--repeats: must be at least 1, got 0"),
        (["--batch", "100000"], "exceeds the"),
        (["--device", "nope"], "--device nope: not a device name"),
        (["--precision", "fp16"], "fp16 needs a CUDA device"),
    ],
    ids=["repeats-0", "batch-too-large", "bad-device", "fp16-on-cpu"],
)
def test_cli_bench_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    try:
        status = main(["bench", *TINY, *argv])
    except SystemExit as error:  # argparse rejects a bad value while parsing
        status = error.code
    assert status == 2  # a usage error
    captured = capsys.readouterr()
    assert captured.err.startswith("flows bench: error:") and message in captured.err
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_bench_cuda_unavailable(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", *TINY, "--device", "cuda"]) == 2
    assert "this machine has no cuda device" in capsys.readouterr().err


def test_gradient_parity_of_an_iresnet_is_not_blurred_by_power_iteration() -> None:
    """Both modes' gradients are taken with the same spectrally normalised weights (in
    training mode the power iteration would move them between the two passes)."""
    from flows.models import IResNet

    torch.manual_seed(0)
    model = IResNet((1, 8, 8), levels=1, blocks=2, hidden_channels=8).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    initialize(model, x)
    report = step_benchmark(model, x, repeats=1, warmup=0)
    assert report.gradient_error < 1e-10  # float64: rounding only


def test_gradient_parity_is_the_helpers_number() -> None:
    """``flows bench`` reports :func:`flows.parity.gradient_parity`'s error, the number
    ``flows.check``, the tests and the experiments report."""
    from flows.parity import gradient_parity

    model = small_glow()
    x = torch.rand(8, 1, 8, 8)
    initialize(model, x)
    report = step_benchmark(model, x, repeats=1, warmup=0)
    assert report.gradient_error == gradient_parity(model, x).error


def test_checkpointed_copy_computes_the_same_density_and_gradients() -> None:
    model = small_glow()
    x = torch.rand(8, 1, 8, 8)
    initialize(model, x)
    copy_ = checkpointed(model)
    torch.testing.assert_close(copy_.log_prob(x), model.log_prob(x))
    want = torch.autograd.grad(-model.log_prob(x).mean(), list(model.parameters()))
    got = torch.autograd.grad(-copy_.log_prob(x).mean(), list(copy_.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="holds no Chain"):
        checkpointed(nn.Linear(2, 2))


def test_compiled_and_bf16_rows() -> None:
    """``aot_eager``: the graphs are captured and compiled as for inductor, run with eager
    kernels (inductor's code generation takes minutes on two cores)."""
    model = small_glow()
    x = torch.rand(8, 1, 8, 8)
    initialize(model, x)
    report = step_benchmark(
        model, x, repeats=1, warmup=1, compiled=True, precision="bf16", compile_options={"backend": "aot_eager"}
    )
    labels = [row.label for row in report.rows]
    assert labels == [
        "ordinary", "memory-saving", "checkpointed", "ordinary, compiled", "memory-saving, compiled",
        "ordinary, bf16", "memory-saving, bf16",
    ]
    compiled = report.row("memory-saving", compiled=True)
    # The first compiled step compiles: slower than its median step.
    assert compiled.first_step_s * 1000 > compiled.wall_ms
    assert compiled.kept_bytes == report.row("memory-saving").kept_bytes
    assert report.agreement is not None and 0 < report.agreement.relative_error < 0.05 and report.compile_unit == "step"
    assert report.agreement.cosine > 0.99
    printed = str(report)
    assert "compiled (unit step): memory-saving / ordinary" in printed and "bf16 gradients against float32" in printed
    assert "| memory-saving, compiled |" in printed


def test_cli_bench_compile_and_precision_flags(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.benchmark

    seen: dict[str, object] = {}
    real = flows.benchmark.step_benchmark

    def spy(model, x, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        kwargs["compile_options"] = {**kwargs["compile_options"], "backend": "eager"}  # keep it quick
        return real(model, x, **kwargs)

    monkeypatch.setattr(flows.benchmark, "step_benchmark", spy)
    assert main(["bench", *TINY, "--batch", "8", "--repeats", "1", "--compile", "--precision", "bf16"]) == 0
    assert seen["compiled"] is True and seen["precision"] == "bf16" and seen["compile_options"] == {"unit": "step"}
    printed = capsys.readouterr().out
    assert "| ordinary, compiled |" in printed and "| memory-saving, bf16 |" in printed
    assert "compiled (unit step): memory-saving / ordinary" in printed
    assert main(["bench", *TINY, "--batch", "8", "--repeats", "1", "--compile", "model"]) == 0
    assert seen["compile_options"] == {"unit": "model"} and "compiled (unit model):" in capsys.readouterr().out
