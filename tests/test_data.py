"""Data layer: the procedural shapes data set, ImageFolder/ImageNet loading, class look-up."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import kornia
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

import cascade.data.imagefolder as imagefolder
from cascade.data import (
    ImageFolderDataset,
    ShapesDataset,
    class_index,
    imagenet_class_names,
    render_shape,
    sample_shape_params,
)
from cascade.data.windows import AlignedWindows

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Render on one thread: per-item work is small, and on a busy 2-core box intra-op
    threads mostly wait on each other (the tests ran 3× slower with 2 threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _downsample(image: Tensor, size: int) -> Tensor:
    """Antialiased downsampling as the cascade does it (kornia), (3, H, W) → (3, size, size)."""
    return kornia.geometry.transform.resize(image[None], (size, size), antialias=True)[0]


def _high_freq_energy(image: Tensor) -> float:
    """Mean squared discrete Laplacian: the energy of the finest scales of a (3, H, W) image."""
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).expand(3, 1, 3, 3)
    return F.conv2d(image[None], kernel, groups=3).pow(2).mean().item()


def _upsample(image: Tensor, size: int) -> Tensor:
    return F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0]


# ----------------------------------------------------------------------------- shapes


def test_shapes_deterministic_per_index() -> None:
    ds = ShapesDataset(resolution=64)
    again = ShapesDataset(resolution=64)
    for i in (0, 7, 12345):
        a, la = ds[i]
        b, lb = again[i]
        assert torch.equal(a, b) and la == lb  # bit-identical, independent of the instance
        assert torch.equal(a, ds[i][0])  # and of the call order
    assert not torch.equal(ds[0][0], ds[10][0])  # same class, different scene
    test = ShapesDataset(resolution=64, split="test")
    assert all(not torch.equal(ds[i][0], test[i][0]) for i in range(5))  # disjoint streams
    other_seed = ShapesDataset(resolution=64, seed=1)
    assert not torch.equal(ds[3][0], other_seed[3][0])
    assert ds.params(3) == sample_shape_params(seed=0, split="train", index=3)


def test_render_shape_is_pure() -> None:
    p = ShapesDataset(resolution=256).params(5)
    assert torch.equal(render_shape(p, 256), render_shape(p, 256))


@pytest.mark.parametrize("resolution", [64, 256, 1024])
def test_shapes_shape_dtype_range(resolution: int) -> None:
    ds = ShapesDataset(resolution=resolution, size=100)
    assert len(ds) == 100
    for i in (0, 5, 99):
        image, label = ds[i]
        assert image.shape == (3, resolution, resolution)
        assert image.dtype == torch.float32
        assert torch.isfinite(image).all()
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert isinstance(label, int) and label == i % ds.num_classes
    with pytest.raises(IndexError):
        ds[100]


def test_shapes_flip_is_mirror() -> None:
    plain = ShapesDataset(resolution=64)[4][0]
    flipping = ShapesDataset(resolution=64, flip=True)
    torch.manual_seed(0)
    seen = {torch.equal(flipping[4][0], plain) for _ in range(12)}
    assert seen == {True, False}
    assert any(torch.equal(flipping[4][0], plain.flip(-1)) for _ in range(12))


@pytest.mark.parametrize("flip", [False, True])
def test_a_rendered_window_is_that_crop_of_the_whole_render(flip: bool) -> None:
    """Windows anywhere (corners, across and beside the object) equal the crop, flip drawn alike."""
    data = ShapesDataset(resolution=256, flip=flip)
    for index in range(4):
        for top, left, size in [(0, 0, 40), (216, 216, 40), (100, 4, 64), (8, 180, 24), (0, 0, 256)]:
            torch.manual_seed(index)
            whole, label = data[index]
            torch.manual_seed(index)
            window, window_label = data.window(index, top, left, size)
            assert window_label == label
            torch.testing.assert_close(window, whole[:, top : top + size, left : left + size], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not inside"):
        render_shape(data.params(0), 256, (250, 0, 8, 8))


class _Plain(torch.utils.data.Dataset):
    """A data set without windows of its own: AlignedWindows crops its whole images."""

    def __init__(self, dataset: ShapesDataset) -> None:
        self.dataset, self.resolution = dataset, dataset.resolution

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.dataset[index]


def test_aligned_windows_are_aligned_inside_and_the_same_however_they_are_made() -> None:
    shapes = ShapesDataset(resolution=128, size=40)
    rendered, cropped = AlignedWindows(shapes, 48, 8), AlignedWindows(_Plain(shapes), 48, 8)
    assert len(rendered) == 40 and rendered.class_names == shapes.class_names
    corners = set()
    for index in range(40):
        torch.manual_seed(index)  # what the trainer's SeededItems does per (seed, epoch, index)
        window, label = rendered[index]
        torch.manual_seed(index)
        assert torch.equal(window, cropped[index][0]) and label == shapes[index][1]
        whole = shapes[index][0]
        found = [
            (y, x) for y in range(0, 81, 8) for x in range(0, 81, 8) if torch.equal(whole[:, y : y + 48, x : x + 48], window)
        ]
        assert len(found) == 1  # an aligned position inside the image
        corners.add(found[0])
    assert len(corners) > 20  # positions spread over the image
    with pytest.raises(ValueError, match="must fit"):
        AlignedWindows(shapes, 44, 8)


def test_shapes_resolution_consistent() -> None:
    """The 1024 render, antialiased down to 256 / 64, matches the 256 / 64 render."""
    for i in range(10):  # one item per class
        r64, r256, r1024 = (ShapesDataset(resolution=r)[i][0] for r in (64, 256, 1024))
        assert (_downsample(r1024, 64) - r64).abs().mean() < 0.03
        assert (_downsample(r1024, 256) - r256).abs().mean() < 0.03
        assert (_downsample(r256, 64) - r64).abs().mean() < 0.03


def test_shapes_fine_detail_only_at_high_resolution() -> None:
    """Texture appears at 256 but not 64; outline and hatching appear at 1024 but not 256."""
    for i in range(0, 10, 3):
        r64, r256, r1024 = (ShapesDataset(resolution=r)[i][0] for r in (64, 256, 1024))
        assert _high_freq_energy(r256) > 50 * _high_freq_energy(_upsample(r64, 256))
        assert _high_freq_energy(r1024) > 10 * _high_freq_energy(_upsample(r256, 1024))


def test_redrawn_detail_is_exactly_what_the_low_res_image_cannot_show() -> None:
    """redraw_unresolved keeps every low-res pixel and changes the high-res ones: at 64 px the texture's phase
    and the hatching are invisible (64 renders equal, 256 renders differ); at 256 px the texture is visible and kept
    (256 renders equal), the hatching is not (1024 renders differ). Deterministic in its generator."""
    for i in (0, 5, 9):
        for low, high in ((64, 256), (256, 1024)):
            data, truth_low = ShapesDataset(resolution=high, split="test"), ShapesDataset(resolution=low, split="test")[i][0]
            redrawn = data.redrawn(i, low, torch.Generator().manual_seed(i))  # (3, high, high)
            assert torch.equal(redrawn, data.redrawn(i, low, torch.Generator().manual_seed(i)))
            assert torch.equal(
                ShapesDataset(resolution=low, split="test").redrawn(i, low, torch.Generator().manual_seed(i)), truth_low
            )
            assert (redrawn - data[i][0]).abs().mean() > 0.005  # the invented detail differs from the truth's
            assert (_downsample(redrawn, low) - truth_low).abs().mean() < 0.03  # and is consistent with the low-res
            assert _high_freq_energy(redrawn) == pytest.approx(_high_freq_energy(data[i][0]), rel=0.25)  # same kind of detail


def test_shapes_classes_visible_at_64() -> None:
    """All classes appear, with distinct names; a nearest-class-mean classifier beats chance."""
    train, test = ShapesDataset(resolution=64), ShapesDataset(resolution=64, split="test")
    assert train.num_classes == len(train.class_names) == 10
    assert len(set(train.class_names)) == 10 and train.class_names[0] == "red disc with stripes"
    assert sorted(train[i][1] for i in range(10)) == list(range(10))

    def batch(ds: ShapesDataset, n: int) -> tuple[Tensor, Tensor]:
        items = [ds[i] for i in range(n)]
        return torch.stack([x for x, _ in items]).flatten(1), torch.tensor([y for _, y in items])

    x, y = batch(train, 500)  # (N, 3·64·64), (N,)
    xt, yt = batch(test, 200)
    means = torch.stack([x[y == c].mean(0) for c in range(10)])  # (10, 3·64·64)
    assert torch.cdist(means, means).add(torch.eye(10) * 1e9).min() > 1.0  # class means differ
    accuracy = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert accuracy > 0.3  # chance is 0.1


def test_shapes_bad_arguments() -> None:
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="val")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="resolution"):
        ShapesDataset(resolution=0)


# ----------------------------------------------------------------------------- image folder


def _save(path: Path, width: int, height: int, color: tuple[int, int, int] = (200, 50, 50)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)


def test_imagefolder_shapes_labels_names(tmp_path: Path) -> None:
    _save(tmp_path / "cat" / "a.png", 300, 200)
    _save(tmp_path / "cat" / "b.jpg", 1000, 480)
    _save(tmp_path / "dog" / "c.jpg", 90, 160)
    _save(tmp_path / "zebra" / "d.png", 20, 33)  # smaller than the resolution: upsampled
    ds = ImageFolderDataset(root=str(tmp_path), resolution=32)
    assert ds.class_names == ["cat", "dog", "zebra"] and ds.num_classes == 3
    assert len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 0, 1, 2]
    for i in range(4):
        image, _ = ds[i]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= -1.0 and image.max() <= 1.0
    expected = torch.tensor([200, 50, 50]) / 127.5 - 1
    assert torch.allclose(ds[0][0].mean((1, 2)), expected, atol=0.02)


@pytest.mark.parametrize("preset", ["tiny", "default"])
def test_every_preset_works_with_a_users_class_folder(tmp_path: Path, preset: str) -> None:
    """The tiny preset's data-set sizes belong to the built-in data set only (preset_data/tiny_shapes.yaml)."""
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    _save(tmp_path / "cat" / "a.png", 80, 80)
    _save(tmp_path / "dog" / "b.png", 80, 80)
    cfg = compose_train(["stage=base", f"preset={preset}", "data=imagefolder", f"data.root={tmp_path}"])
    ds = instantiate(cfg.data.train, resolution=64)
    assert isinstance(ds, ImageFolderDataset) and len(ds) == 2 and cfg.data.val is None
    shapes = compose_train(["stage=base", f"preset={preset}"]).data
    assert (shapes.train.size, shapes.val.size) == ((20000, 500) if preset == "tiny" else (50000, 1000))


def _three_bands(width: int, height: int) -> Image.Image:
    """Blue margins, and a centre square whose left half is red and right half green."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image.paste((255, 0, 0), (left, top, left + side // 2, top + side))
    image.paste((0, 255, 0), (left + side // 2, top, left + side, top + side))
    return image


@pytest.mark.parametrize("size", [(400, 200), (120, 360)])
def test_imagefolder_center_crop_keeps_centre(tmp_path: Path, size: tuple[int, int]) -> None:
    (tmp_path / "a").mkdir()
    _three_bands(*size).save(tmp_path / "a" / "x.png")
    image = ImageFolderDataset(root=str(tmp_path), resolution=32, flip=False)[0][0]  # (3, 32, 32)
    left, right = image[:, 4:-4, 2:14].mean((1, 2)), image[:, 4:-4, 18:30].mean((1, 2))
    assert torch.allclose(left, torch.tensor([1.0, -1, -1]), atol=0.05)  # red, no blue margin
    assert torch.allclose(right, torch.tensor([-1.0, 1, -1]), atol=0.05)  # green

    flipping = ImageFolderDataset(root=str(tmp_path), resolution=32, flip=True)
    torch.manual_seed(0)
    seen = {bool(flipping[0][0][0, 16, 4] > 0) for _ in range(12)}  # red on the left?
    assert seen == {True, False}


def test_imagefolder_synset_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "n01440764" / "a.png", 40, 40)
    _save(tmp_path / "n02099601" / "b.png", 40, 40)
    ds = ImageFolderDataset(root=str(tmp_path), resolution=16)
    assert ds.class_names == ["tench", "golden retriever"]
    assert ds.folders == ["n01440764", "n02099601"]
    assert class_index(ds.class_names, "Golden Retriever") == 1

    synsets = imagefolder._imagenet_synsets()
    assert synsets is not None and synsets[207] == "n02099601"
    assert imagenet_class_names(list(synsets))[207] == "golden retriever"
    assert imagenet_class_names(["n01440764", "dogs"]) is None  # mixed tree: folder names
    # without a synset list only the complete set of 1000 folders is mapped
    monkeypatch.setattr(imagefolder, "_imagenet_synsets", lambda: None)
    assert imagenet_class_names(list(synsets))[207] == "golden retriever"
    assert imagenet_class_names(["n01440764", "n02099601"]) is None
    assert ImageFolderDataset(root=str(tmp_path), resolution=16).class_names == ["n01440764", "n02099601"]


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(root=str(tmp_path / "missing"), resolution=32)
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderDataset(root=str(tmp_path), resolution=32)
    _save(tmp_path / "ok" / "a.png", 40, 40)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images.*empty") as info:
        ImageFolderDataset(root=str(tmp_path), resolution=32)
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- class_index


def test_class_index() -> None:
    names = ShapesDataset().class_names
    assert class_index(names, 3) == 3
    assert class_index(names, "7") == 7
    assert class_index(names, " Red Disc With Stripes ") == 0
    imagenet_like = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    assert class_index(imagenet_like, "carassius AURATUS") == 1
    assert class_index(imagenet_like, "tench, tinca tinca") == 0
    assert class_index(imagenet_like, "great white shark") == 2

    with pytest.raises(ValueError, match="close matches: 'red disc with stripes' \\(0\\)"):
        class_index(names, "red disk with stripes")
    with pytest.raises(
        ValueError, match="unknown class 'giraffe'; pass an index 0..9 or one of: 'red disc with stripes' \\(0\\), "
    ):
        class_index(names, "giraffe")  # a short class list is shown whole
    with pytest.raises(ValueError, match="or one of the 30 class names$"):
        class_index([f"class {i}" for i in range(30)], "giraffe")
    for bad in (10, "10", -1, "-1"):
        with pytest.raises(ValueError, match="0\\.\\.9"):
            class_index(names, bad)
    with pytest.raises(ValueError, match="ambiguous"):
        class_index(["crane", "crane"], "crane")
