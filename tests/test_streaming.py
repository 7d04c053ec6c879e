"""Streaming data: image folders and memory-mapped arrays, read by DataLoader workers.

Each test writes its own small files (PNGs with Pillow, ``.npy`` / ``.npz`` with numpy).
Training on a streaming dataset gives bitwise the parameters of training on the same
examples held in memory: the workers dequantize every example with its keyed noise.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows import data as datasets
from flows.cli import main
from flows.data.streaming import StreamingDataset, example_seed, open_path, prepare_examples
from flows.models import Glow
from flows.training import TrainConfig, load_checkpoint, train


def _write_images(folder: Path, arrays: list[np.ndarray], suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, array in enumerate(arrays):
        files.append(folder / f"img{i:02d}{suffix}")
        Image.fromarray(array).save(files[-1])
    return files


def _grey(n: int, h: int = 8, w: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w), dtype=np.uint8) for _ in range(n)]


def _in_memory(stream: datasets.Dataset) -> datasets.Dataset:
    read = [split[torch.arange(len(split))] for split in (stream.train, stream.test)]
    return datasets.Dataset("in-memory", *read, stream.n_levels, stream.shape)


# -- image folders -----------------------------------------------------------------------------


def test_folder_of_grey_pngs(tmp_path: Path) -> None:
    arrays = _grey(10)
    _write_images(tmp_path / "imgs", arrays)
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"hidden files are skipped")
    data = open_path(tmp_path / "imgs", n_test=3, workers=0)
    assert isinstance(data, StreamingDataset) and data.n_levels == 256 and data.shape == (1, 8, 8)
    assert (len(data.train), len(data.test)) == (7, 3)
    every = torch.cat([data.train[torch.arange(7)], data.test[:]])
    assert every.dtype == torch.uint8 and every.shape == (10, 1, 8, 8)
    # The two splits hold every image once, pixel for pixel.
    expected = sorted(a.tobytes() for a in arrays)
    assert sorted(x[0].numpy().tobytes() for x in every) == expected
    assert torch.equal(data.train[2], data.train[torch.tensor([2])][0])


def test_colour_images_of_mixed_sizes_are_resized_and_centre_cropped(tmp_path: Path) -> None:
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 200  # the centre 8 columns of a 16-wide image
    big = np.full((16, 16, 3), 90, dtype=np.uint8)
    _write_images(tmp_path / "imgs", [wide, big, big])
    data = open_path(tmp_path / "imgs", image_size=8, n_test=1, workers=0)
    assert data.shape == (3, 8, 8)
    every = torch.cat([data.train[:], data.test[:]])
    # The wide image keeps its height (the shorter side is 8 already) and loses 4 columns each side.
    assert sorted(int(x.float().mean()) for x in every) == [90, 90, 200]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d.mkdir(), "no image files in it; put PNG or JPEG images there"),
        (
            lambda d: _write_images(d, [*_grey(2), *_grey(1, 6, 6)]),
            r"images of different sizes \(8x8 img00.png, 6x6 img02.png\); give --image-size N",
        ),
        (
            lambda d: (_write_images(d, _grey(2)), (d / "notes.txt").write_text("no image")),
            "notes.txt is not an image Pillow can read; remove it",
        ),
        (lambda d: _write_images(d, _grey(1)), "1 examples cannot give 1 test examples"),
    ],
    ids=["empty", "mixed-sizes", "non-image", "too-few"],
)
def test_folder_errors(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "imgs"
    make(folder)
    with pytest.raises(ValueError, match=message):
        open_path(folder)


# -- arrays ------------------------------------------------------------------------------------


def test_npy_is_memory_mapped(tmp_path: Path) -> None:
    levels = np.random.default_rng(0).integers(0, 256, (20, 3, 4, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", levels)
    data = open_path(tmp_path / "x.npy", n_test=5, seed=1)
    assert data.shape == (3, 4, 4) and data.n_levels == 256
    assert isinstance(data.train._array(), np.memmap)
    rows = data.train.rows[[3, 0, 7]]
    assert torch.equal(data.train[torch.tensor([3, 0, 7])], torch.from_numpy(levels[rows]))
    # A worker process gets the split without its memory map and maps the file again.
    copy = pickle.loads(pickle.dumps(data.train))
    assert "_open_array" not in copy.__dict__ and torch.equal(copy[:], data.train[:])


def test_npz_with_train_and_test(tmp_path: Path) -> None:
    vectors = np.random.default_rng(0).normal(size=(12, 2)).astype(np.float32)
    np.savez(tmp_path / "v.npz", train=vectors[:9], test=vectors[9:])
    data = open_path(tmp_path / "v.npz")
    assert data.n_levels is None and not data.discrete and data.shape == (2,)
    assert torch.equal(data.train[:], torch.from_numpy(vectors[:9]))
    assert torch.equal(data.test[:], torch.from_numpy(vectors[9:]))


@pytest.mark.parametrize(
    "save, message",
    [
        (lambda f: np.save(f.with_suffix(".npy"), np.zeros((4, 8, 8), np.uint8)), r"shape \(4, 8, 8\) \(rank 3\)"),
        (lambda f: np.save(f.with_suffix(".npy"), np.zeros((4, 1, 2, 2), np.float32)), "images must be uint8"),
        (lambda f: np.save(f.with_suffix(".npy"), np.zeros((4, 2), np.int64)), "vectors must be floating point"),
        (lambda f: np.savez_compressed(f.with_suffix(".npz"), train=np.zeros((4, 2))), "is compressed"),
        (lambda f: np.savez(f.with_suffix(".npz"), a=np.zeros((4, 2)), b=np.zeros((4, 2))), "name them train"),
    ],
    ids=["rank-3", "float-images", "int-vectors", "compressed", "unnamed"],
)
def test_array_errors(tmp_path: Path, save, message: str) -> None:
    save(tmp_path / "x")
    (file,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match=message):
        open_path(file)


def test_load_routes_paths_and_names_missing_ones(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((10, 1, 2, 2), np.uint8))
    assert isinstance(datasets.load(str(tmp_path / "x.npy")), StreamingDataset)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        datasets.load(str(tmp_path / "missing.npy"))
    with pytest.raises(ValueError, match="or give the path of an image folder"):
        datasets.load("nope")


# -- keyed noise and training through the loader ------------------------------------------------


def test_noise_is_keyed_per_example() -> None:
    digits = datasets.load("digits")
    x = digits.train[:6]
    seeds = [example_seed(0, 0, 1, j) for j in range(6)]
    whole = prepare_examples(digits, x, seeds)
    assert torch.equal(whole[3:], prepare_examples(digits, x[3:], seeds[3:]))
    assert not torch.equal(whole, prepare_examples(digits, x, [s + 1 for s in seeds]))
    assert bool(((whole >= 0) & (whole < 1)).all())
    assert torch.equal((whole * 17).floor().to(torch.uint8), x)


def _tiny_glow() -> torch.nn.Module:
    torch.manual_seed(0)
    return Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, n_levels=17)


def _config(out: Path, steps: int, resume: bool = False) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=16,
        lr=3e-3,
        warmup=0,
        init_batch_size=32,
        eval_every=2,
        validation=16,
        progress=False,
        out_dir=out,
        resume=resume,
    )


@pytest.fixture(scope="module")
def digits_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    file = tmp_path_factory.mktemp("npy") / "digits.npy"
    np.save(file, datasets.load("digits").train[:400].numpy())
    return file


def test_training_through_loader_workers_equals_training_in_memory(digits_npy: Path, tmp_path: Path) -> None:
    stream = open_path(digits_npy, workers=2)
    streamed, held = _tiny_glow(), _tiny_glow()
    history = train(streamed, stream, _config(tmp_path / "stream", 4))
    expected = train(held, _in_memory(stream), _config(tmp_path / "memory", 4))
    assert history["train"] == expected["train"] and history["test"] == expected["test"]
    for name, value in held.state_dict().items():
        assert torch.equal(streamed.state_dict()[name], value), name


def test_streaming_run_resumes_exactly(digits_npy: Path, tmp_path: Path) -> None:
    whole = train(_tiny_glow(), open_path(digits_npy, workers=1), _config(tmp_path / "whole", 4))
    train(_tiny_glow(), open_path(digits_npy, workers=1), _config(tmp_path / "parts", 2))
    resumed = train(_tiny_glow(), open_path(digits_npy, workers=1), _config(tmp_path / "parts", 4, resume=True))
    assert resumed["train"] == whole["train"]


def test_cli_trains_on_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_images(tmp_path / "imgs", _grey(20, 10, 12))
    argv = ["train", "--data", str(tmp_path / "imgs"), "--image-size", "8", "--workers", "1", "--levels", "1"]
    argv += ["-K", "1", "--hidden", "8", "--batch", "8", "--steps", "2", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    state = load_checkpoint(tmp_path / "r")
    assert state["step"] == 2 and state["data"]["shape"] == [1, 8, 8]
    assert state["config"]["data"]["image_size"] == 8
    # The run resumes from its checkpoint, which names the folder and the image size.
    assert main(["train", "--resume", "--steps", "3", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert load_checkpoint(tmp_path / "r")["step"] == 3
    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e"), "--steps", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: no image files in it" in err[0]
