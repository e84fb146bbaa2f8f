"""Shared fixtures: `cli.py` in this process, and tiny on-disk datasets in the exact formats
the real ones use."""

import hashlib
import pickle
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from helpers import CliResult, run_cli_in_process
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from refiner_pl.callbacks import cpu_memory


@pytest.fixture(autouse=True, scope="session")
def malloc_defaults_in_the_test_process() -> Iterator[None]:
    """CLI runs in this process leave glibc's malloc as it is.

    `KeepFreedMemory` (on by default in CPU runs) switches it for good, process-wide: the test
    process would keep its peak footprint, and the benchmark tests would measure another
    allocator. tests/callbacks/test_cpu_memory.py checks the switch in its own interpreter.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_memory, "keep_freed_memory", lambda: False)
        yield


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., CliResult]:
    """``run_cli(*args, cwd=tmp_path)``: ``python cli.py ARGS`` run in this process (through
    `refiner_pl.cli.main`) in `cwd`; returns the exit status and the output. A bad input
    reads as ``result.error``, the single ``error:`` line of an exit with status 2."""

    def run(*args: str, cwd: Path | None = None) -> CliResult:
        return run_cli_in_process(*args, cwd=cwd or tmp_path)

    return run


CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR100_CLASSES = """
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile
cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp
lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree
orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum
rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train
trout tulip turtle wardrobe whale willow_tree wolf woman worm
""".split()
CIFAR100_SUPERCLASSES = """
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices
household_furniture insects large_carnivores large_man-made_outdoor_things
large_natural_outdoor_scenes large_omnivores_and_herbivores medium_mammals
non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2
""".split()

# Real ImageNet-1k WordNet ids: tench, goldfish, great white shark.
WNIDS = ["n01440764", "n01443537", "n01484850"]


class _Py2Pickler(pickle._Pickler):
    """Pickles ``bytes`` as Python 2 ``str`` opcodes, as in the real CIFAR files.

    Those files were written by Python 2, so their keys load as ``b"data"`` with
    ``encoding="bytes"`` and as ``"data"`` with the ``encoding="latin1"`` torchvision uses.
    Python 3's pickler would write ``bytes`` in a form that loads as bytes either way.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(path: Path, obj: dict) -> str:
    """Writes `obj` as a protocol-2 Python 2 style pickle; returns the file's md5."""
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass
class FakeCifar:
    """Where the tiny CIFARs live and what they hold (images are HWC uint8, in file order)."""

    path: Path
    cifar10_classes: list[str]
    cifar100_classes: list[str]
    train_size: int
    test_size: int
    test_images: dict[str, np.ndarray] = field(default_factory=dict)
    test_labels: dict[str, list[int]] = field(default_factory=dict)


def _records(rng: np.random.Generator, n: int, num_classes: int) -> tuple[np.ndarray, list[int]]:
    data = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R, G, B planes
    labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
    return data, labels


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCifar:
    """A tiny CIFAR-10 and CIFAR-100 side by side, in torchvision's exact on-disk format.

    ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
    ``cifar-100-python/{train, test, meta}`` are Python 2 style pickles with the real keys
    (``b"data"``: uint8 N x 3072, ``b"labels"`` / ``b"fine_labels"``, meta
    ``b"label_names"`` / ``b"fine_label_names"``) and the real class names.

    Integrity: torchvision's ``_check_integrity`` / ``_load_meta`` compare each file's md5
    with the published sums in the class attributes ``train_list``, ``test_list`` and
    ``meta``. Instead of bypassing that check, this fixture replaces only those sums (for the
    duration of the test, via monkeypatch) with the md5 of the files it wrote. The dataset
    classes, their loading code and the md5 verification itself run unmodified, so the
    datamodules use the real torchvision loading path and a corrupted file would still fail.
    """
    rng = np.random.default_rng(0)
    per_batch, test_size = 4, 10
    fake = FakeCifar(tmp_path, CIFAR10_CLASSES, CIFAR100_CLASSES, 5 * per_batch, test_size)

    def write(cls: type[CIFAR10], files: dict[str, dict], meta: dict) -> None:
        folder = tmp_path / cls.base_folder
        folder.mkdir()
        sums = {name: _dump_py2(folder / name, obj) for name, obj in files.items()}
        sums[cls.meta["filename"]] = _dump_py2(folder / cls.meta["filename"], meta)
        monkeypatch.setattr(cls, "train_list", [[n, sums[n]] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, sums[n]] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": sums[cls.meta["filename"]]})

    # CIFAR-10: five train batches plus a test batch, labels under b"labels".
    files = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = test_size if name == "test_batch" else per_batch
        data, labels = _records(rng, n, 10)
        files[name] = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n)],
        }
    fake.test_images["cifar10"] = files["test_batch"][b"data"].reshape(-1, 3, 32, 32)
    fake.test_images["cifar10"] = fake.test_images["cifar10"].transpose(0, 2, 3, 1)
    fake.test_labels["cifar10"] = files["test_batch"][b"labels"]
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": 3072,
    }
    write(CIFAR10, files, meta)

    # CIFAR-100: one train and one test file, labels under b"fine_labels" / b"coarse_labels".
    files = {}
    for name, n in (("train", fake.train_size), ("test", test_size)):
        data, labels = _records(rng, n, 100)
        files[name] = {
            b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
            b"batch_label": f"{name}ing batch 1 of 1".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": data,
        }
    fake.test_images["cifar100"] = files["test"][b"data"].reshape(-1, 3, 32, 32)
    fake.test_images["cifar100"] = fake.test_images["cifar100"].transpose(0, 2, 3, 1)
    fake.test_labels["cifar100"] = files["test"][b"fine_labels"]
    meta = {
        b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
        b"coarse_label_names": [c.encode() for c in CIFAR100_SUPERCLASSES],
    }
    write(CIFAR100, files, meta)
    return fake


@dataclass
class ImageTree:
    """A folder-per-class image tree; `colors` maps each file's path to its solid RGB colour."""

    path: Path
    classes: list[str]
    counts: dict[str, int]  # images per class, per split
    colors: dict[Path, tuple[int, int, int]]


_SIZES = [(48, 40), (33, 80), (120, 90), (64, 64), (90, 31)]


@pytest.fixture
def make_image_tree() -> Callable[..., ImageTree]:
    """Factory: ``make(root, classes, counts={"train": 4, "val": 2}, ext=".JPEG")``.

    Each image is a random solid colour of varying size; every third one is greyscale ("L"),
    as some ImageNet JPEGs are, to exercise the RGB conversion.
    """
    rng = np.random.default_rng(1)

    def make(
        root: Path,
        classes: list[str],
        counts: dict[str, int] | None = None,
        ext: str = ".JPEG",
    ) -> ImageTree:
        counts = counts or {"train": 4, "val": 2}
        colors: dict[Path, tuple[int, int, int]] = {}
        k = 0
        for split, n in counts.items():
            for cls in classes:
                folder = root / split / cls
                folder.mkdir(parents=True)
                for j in range(n):
                    size = _SIZES[k % len(_SIZES)]
                    if k % 3 == 2:
                        value = int(rng.integers(0, 256))
                        image, rgb = Image.new("L", size, value), (value,) * 3
                    else:
                        rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
                        image = Image.new("RGB", size, rgb)
                    path = folder / f"{cls}_{j}{ext}"
                    image.save(path, quality=95)
                    colors[path] = rgb
                    k += 1
        return ImageTree(root, list(classes), dict(counts), colors)

    return make


@pytest.fixture
def jpeg_tree(tmp_path: Path, make_image_tree: Callable[..., ImageTree]) -> ImageTree:
    """An ImageNet-style tree ``train/<wnid>/*.JPEG`` (4 per class), ``val/<wnid>/*.JPEG`` (2)."""
    return make_image_tree(tmp_path / "imagenet", WNIDS, {"train": 4, "val": 2})


@pytest.fixture
def one_thread():
    """Runs torch on one CPU thread for the test.

    The test models are tiny: on small CPU hosts, intra-op threads spend far more time
    synchronising than computing (a 2-core host ran a tiny fit 20x+ slower on 2 threads).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class MixedFolder:
    """A folder to predict on: `good` image files and `bad` ones, as paths relative to it."""

    path: Path
    good: list[str]
    bad: list[str]


@pytest.fixture
def mixed_image_folder(tmp_path: Path) -> MixedFolder:
    """PNG, JPEG, greyscale, RGBA, palette and 16-bit images of odd sizes (one nested), plus a
    truncated JPEG, a text file and a hidden file (ignored)."""
    rng = np.random.default_rng(2)
    root = tmp_path / "to_predict"
    (root / "nested").mkdir(parents=True)

    def noise(*shape: int) -> np.ndarray:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)

    Image.fromarray(noise(40, 52, 3)).save(root / "colour.png")
    Image.fromarray(noise(70, 31, 3)).save(root / "photo.jpg", quality=90)
    Image.fromarray(noise(25, 25), "L").save(root / "grey.png")
    Image.fromarray(noise(33, 47, 4), "RGBA").save(root / "nested" / "alpha.png")
    Image.fromarray(noise(30, 30, 3)).convert("P").save(root / "palette.gif")
    Image.fromarray(rng.integers(0, 65535, size=(20, 24), dtype=np.uint16)).save(root / "deep.tif")
    jpeg = (root / "photo.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "notes.txt").write_text("not an image\n")
    (root / ".DS_Store").write_bytes(b"\0\1\2")
    good = ["colour.png", "deep.tif", "grey.png", "nested/alpha.png", "palette.gif", "photo.jpg"]
    return MixedFolder(root, good, ["notes.txt", "truncated.jpg"])
