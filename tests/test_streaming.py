"""Streaming data: image folders and memory-mapped arrays, read by DataLoader workers.

Each test writes its own small files (PNGs with Pillow, ``.npy`` / ``.npz`` with numpy).
Training on a streaming dataset gives bitwise the parameters of training on the same
examples held in memory: the workers dequantize every example with its keyed noise. Class
labels (``labels=True``, ``--conditional``) come from class subfolders or an ``.npz``'s label
arrays; the test images' pixels encode their class, so a label can be checked against the
example it travels with.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flows import data as datasets
from flows.cli import main
from flows.data.streaming import StreamingDataset, UnreadableImage, example_seed, open_path, prepare_examples
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


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "2-workers"])
def test_a_truncated_image_is_named_whichever_worker_reads_it(tmp_path: Path, workers: int) -> None:
    files = _write_images(tmp_path / "imgs", _grey(6))
    for file in files[2:4]:  # two, so that one lies in the training split (the test split holds one)
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    data = open_path(tmp_path / "imgs", n_test=1, workers=workers)  # its header reads: found on decoding
    with pytest.raises(UnreadableImage) as caught:
        for _ in data.loader([[(p, 0)] for p in range(len(data.train))]):
            pass
    error = caught.value
    assert error.filename in {str(f) for f in files[2:4]} and error.errno == errno.EIO
    assert "\n" not in str(error) and "image file is truncated" in error.strerror
    assert error.strerror.endswith("remove or replace the file")


def test_cli_truncated_image_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    files = _write_images(tmp_path / "imgs", _grey(10))
    files[4].write_bytes(files[4].read_bytes()[: files[4].stat().st_size // 2])  # a whole header, half the pixels
    argv = ["train", "--data", str(tmp_path / "imgs"), "--workers", "2", "--levels", "1", "-K", "1", "--hidden", "8"]
    argv += ["--batch", "8", "--steps", "2", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot decode the image" in err[0] and f"({files[4]})" in err[0]


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
        (lambda f: np.savez(f.with_suffix(".npz"), a=np.zeros((4, 2)), b=np.zeros((4, 2))), "name them x and y"),
        (lambda f: np.save(f.with_suffix(".npy"), np.array([[0, 1], [np.nan, 0], [2, 3], [0, -np.inf]], np.float32)),
         r"2 of 4 rows hold NaN or inf \(rows 1, 3\); drop them"),
        (lambda f: np.savez(f.with_suffix(".npz"), x=np.zeros((4, 2)), x_test=np.full((2, 2), np.inf)),
         r"\[x_test\]: 2 of 2 rows hold NaN or inf"),
    ],
    ids=["rank-3", "float-images", "int-vectors", "compressed", "unnamed", "non-finite", "non-finite-test"],
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
    """For the digits saved as uint8, which a file's reader takes for 8-bit levels."""
    torch.manual_seed(0)
    return Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, n_levels=256)


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


@pytest.mark.parametrize("workers", [0, 1])
def test_reading_batches_leaves_the_global_random_stream_alone(digits_npy: Path, workers: int) -> None:
    """A loader's iterator drew its workers' base seed from torch's global generator: a resumed
    session (a new iterator) shifted the stream a model draws from (i-ResNet's probes, dropout),
    so such a run did not resume exactly."""
    data = open_path(digits_npy, workers=workers)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(data.loader([[(0, 0), (1, 1)]])))
    assert torch.equal(torch.get_rng_state(), before)


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


# -- class labels: class subfolders and .npz label arrays -----------------------------------------


def _class_pixels(label: int, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` grey 8x8 images whose levels lie in class ``label``'s band ``[90 label, 90 label + 60)``."""
    rng = np.random.default_rng(seed + label)
    return [rng.integers(90 * label, 90 * label + 60, (8, 8), dtype=np.uint8) for _ in range(n)]


def _band(x: torch.Tensor) -> torch.Tensor:
    """The class each example's pixels encode (levels, or dequantized values in [0, 1))."""
    levels = x.float() * 256 if x.is_floating_point() else x.float()
    return (levels.flatten(1).mean(1) // 90).long()


def _class_folder(root: Path, names: tuple[str, ...] = ("dog", "cat", "fish"), n: int = 8) -> Path:
    """``root/<name>/*.png`` per class; the classes are the sorted names, so ``cat`` is 0."""
    for name in names:
        _write_images(root / name, _class_pixels(sorted(names).index(name), n))
    return root


def test_class_subfolders_are_the_labels_in_sorted_order(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / "pets", n=6)
    _write_images(root / "fish" / "more", _class_pixels(2, 2, seed=9))  # a class folder's subfolders count
    (root / ".cache").mkdir()  # hidden entries are no class
    data = open_path(root, n_test=5, workers=0, labels=True)
    assert data.classes == ("cat", "dog", "fish") and data.num_classes == 3
    assert (len(data.train), len(data.test)) == (15, 5)
    for split, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        assert labels.dtype == torch.int64 and torch.equal(labels, _band(split[:]))
    assert sorted(torch.cat([data.train_labels, data.test_labels]).tolist()) == [0] * 6 + [1] * 6 + [2] * 8
    assert data.test[torch.arange(0)].shape == (0, 1, 8, 8)  # an empty batch reads as one
    # Without labels the same folder reads as before: the same examples, no classes.
    plain = open_path(root, n_test=5, workers=0)
    assert plain.train_labels is None and plain.classes is None and torch.equal(plain.train[:], data.train[:])


def test_a_folder_below_a_hidden_folder_is_read(tmp_path: Path) -> None:
    root = _class_folder(tmp_path / ".cache" / "pets", names=("a", "b"), n=3)
    assert len(open_path(root, n_test=1, labels=True).train) == 5


@pytest.mark.parametrize(
    "names",
    [("x", "y"), ("images", "labels"), ("train", "train_labels"), ("x_train", "y_train")],
    ids=lambda names: "-".join(names),
)
def test_npz_labels(tmp_path: Path, names: tuple[str, str]) -> None:
    y = np.arange(20) % 3
    x = np.stack([_class_pixels(int(k), 1, seed=i)[0][None] for i, k in enumerate(y)])
    np.savez(tmp_path / "d.npz", **{names[0]: x, names[1]: y.astype(np.uint8)})
    data = open_path(tmp_path / "d.npz", n_test=4, labels=True)
    assert data.num_classes == 3 and data.classes is None and data.train_labels.dtype == torch.int64
    # The labels are split with their examples.
    assert torch.equal(data.train_labels, _band(data.train[:])) and torch.equal(data.test_labels, _band(data.test[:]))
    assert torch.equal(data.train_labels, torch.from_numpy(y[data.train.rows]))
    assert open_path(tmp_path / "d.npz").train_labels is None  # read only when asked for


def test_npz_test_split_with_labels(tmp_path: Path) -> None:
    x = np.zeros((10, 1, 2, 2), np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(10) % 2, x_test=x[:3], y_test=np.array([1, 0, 1]))
    data = open_path(tmp_path / "d.npz", labels=True)
    assert data.test_labels.tolist() == [1, 0, 1] and data.train_labels.tolist() == [0, 1] * 5


def _npz(**arrays: np.ndarray):
    return lambda root: np.savez(root.with_suffix(".npz"), **arrays)


_X = np.zeros((6, 1, 2, 2), np.uint8)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _write_images(d, _grey(4)), r"classes from subfolders, flat/<class>/\*.png, but it has none"),
        (
            lambda d: (_class_folder(d, ("a", "b"), 2), _write_images(d, _grey(1))),
            r"1 file\(s\) \(img00.png, ...\) lie beside the class subfolders",
        ),
        (lambda d: (_class_folder(d, ("a", "b"), 2), (d / "c").mkdir()), "class folder c holds no image files"),
        (lambda d: _class_folder(d, ("a",), 4), r"one class subfolder \(a\); a class-conditional model needs"),
        (lambda d: np.save(d.with_suffix(".npy"), _X), "a .npy file holds no labels"),
        (_npz(x=_X), "holds no label array"),
        (_npz(x=_X, y=np.arange(5)), r"\[y\]: 5 labels for the 6 examples of x; give one label per example"),
        (_npz(x=_X, y=np.arange(6) * 0.5), r"labels must be integers, got float64; number the classes 0..K-1"),
        (_npz(x=_X, y=np.array(list("abcabc"))), r"labels must be integers, got <U1"),
        (_npz(x=_X, y=np.eye(6, dtype=np.int64)), r"shape \(N,\), one class per example, got \(6, 6\) \(one-hot"),
        (_npz(x=_X, y=np.arange(6) - 1), "labels must be >= 0, got -1"),
        (_npz(x=_X, y=np.zeros(6, np.int64)), "every label is 0; a class-conditional model needs at least 2 classes"),
        (_npz(x=_X, y=np.array([0, 1, 0, 1, 0, 99])), "labels up to 99 for 6 examples; number the classes"),
        (_npz(x=_X, y=np.arange(6) % 2, x_test=_X), "holds x_test but no y_test"),
        (_npz(x=_X, images=_X, y=np.arange(6) % 2), "holds both x and images"),
    ],
    ids=[
        "flat-folder", "loose-file", "empty-class", "one-class", "npy", "no-labels", "wrong-length", "float-labels",
        "string-labels", "one-hot", "negative", "one-label", "sparse", "test-without-labels", "two-image-arrays",
    ],
)
def test_label_errors(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "flat")
    (path,) = tmp_path.iterdir()
    with pytest.raises(ValueError, match=message) as error:
        open_path(path, labels=True)
    assert "\n" not in str(error.value)


def _tiny_class_glow(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return Glow((1, 8, 8), levels=1, steps=1, hidden_channels=8, n_levels=256, num_classes=classes)


def test_labels_stay_with_their_examples_through_loader_workers(tmp_path: Path) -> None:
    data = open_path(_class_folder(tmp_path / "pets", n=12), n_test=6, workers=2, labels=True)
    model = _tiny_class_glow()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    log_prob = model.log_prob

    def spy(x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        seen.append((x.detach().clone(), context.clone()))
        return log_prob(x, context)

    model.log_prob = spy  # every batch the model sees: training (from the workers), validation, test
    config = TrainConfig(steps=3, batch_size=8, eval_every=3, validation=4, progress=False, init_batch_size=8)
    train(model, data, config)
    assert len(seen) >= 3 and sum(len(c) for _, c in seen) >= 3 * 8
    for x, context in seen:
        assert torch.equal(context, _band(x))


def test_class_conditional_log_prob_uses_the_labels(tmp_path: Path) -> None:
    data = open_path(_class_folder(tmp_path / "pets"), n_test=6, workers=0, labels=True)
    model = _tiny_class_glow()
    train(model, data, TrainConfig(steps=3, batch_size=8, lr=1e-2, warmup=0, progress=False, init_batch_size=8))
    x = prepare_examples(data, data.test[:], [example_seed(0, i) for i in range(len(data.test))])
    with torch.no_grad():
        right = model.log_prob(x, data.test_labels)
        wrong = model.log_prob(x, (data.test_labels + 1) % 3)
    assert right.mean() > wrong.mean()  # three steps already tell the classes apart


def test_cli_class_conditional_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, out = _class_folder(tmp_path / "pets"), tmp_path / "run"
    argv = ["train", "--data", str(root), "--conditional", "--workers", "2", "--levels", "1", "-K", "1"]
    argv += ["--hidden", "8", "--batch", "8", "--steps", "2", "--eval-every", "2", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("by label: 0 cat, 1 dog, 2 fish") == 1
    state = load_checkpoint(out)
    assert state["config"]["classes"] == ["cat", "dog", "fish"] and state["config"]["kwargs"]["num_classes"] == 3
    assert state["data"]["context"] == "labels" and state["config"]["data"]["labels"] is True
    assert main(["train", "--resume", "--steps", "3", "--no-progress", "--out", str(out)]) == 0
    assert load_checkpoint(out)["step"] == 3
    # The 2 test images are of 2 classes: no same-class pair to interpolate, so no figure and one line.
    assert open_path(root, labels=True).test_labels.unique().numel() == 2
    assert not (out / "interpolation.png").exists() and (out / "samples.png").is_file()
    capsys.readouterr()
    assert main(["interpolate", str(out), "--pairs", "1"]) == 2
    assert "holds no two images of one class to interpolate between" in capsys.readouterr().err
    for label in ("dog", "1"):
        assert main(["sample", str(out), "--class", label, "--n", "2", "--out", str(tmp_path / f"{label}.png")]) == 0
        assert (tmp_path / f"{label}.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["sample", str(out), "--class", "cow"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"flows sample: error: --class cow: not a class of {out}; its classes are cat, dog, fish; "
        "or give an index 0 to 2"
    ]
    # A class folder added since would shift the labels: the resumed run refuses.
    _write_images(root / "ant", _grey(2))
    assert main(["train", "--resume", "--steps", "4", "--no-progress", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are now ant, cat, dog, fish, but the run was trained on cat, dog, fish" in err[0]


def test_cli_conditional_on_a_flat_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _write_images(tmp_path / "flat", _grey(10))
    assert main(["train", "--data", str(tmp_path / "flat"), "--conditional", "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "takes the classes from subfolders" in err[0] and "put each class's images" in err[0]
