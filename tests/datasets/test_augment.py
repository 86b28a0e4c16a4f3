"""Training and evaluation transforms (numpy + PIL only): shapes, shared geometry,
colour-only strong view, nearest-only masks, determinism, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from wsss.datasets.augment import AugmentConfig, EvalTransform, TrainTransform
from wsss.datasets.photometric import RANDAUGMENT_OPS, color_jitter, gaussian_blur
from wsss.datasets.shards import encode_mask
from wsss.io import DataError

K = 3
PALETTE = np.array([[0, 0, 0], [220, 20, 60], [30, 144, 255], [255, 215, 0]], dtype=np.uint8)


def blocky_mask(rng, height, width, block=8) -> np.ndarray:
    """Classes 0..K in blocks (so interiors survive resampling), a few void pixels."""
    coarse = rng.integers(0, K + 1, size=(height // block + 1, width // block + 1), dtype=np.uint8)
    mask = np.kron(coarse, np.ones((block, block), dtype=np.uint8))[:height, :width]
    mask[0, :3] = 255
    return mask


def encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def make_batch(sizes=((40, 56), (64, 48), (30, 30)), fmt="PNG", seed=0, colour_coded=False) -> dict:
    """Numpy batch in the shard columns. colour_coded: the image is the mask drawn in
    PALETTE colours (lossless PNG), so pixel colours reveal where the mask went."""
    rng = np.random.default_rng(seed)
    rows = {"id": [], "image": [], "mask": [], "target": [], "labels": [], "height": [], "width": []}
    for index, (height, width) in enumerate(sizes):
        mask = blocky_mask(rng, height, width)
        if colour_coded:
            image = PALETTE[np.where(mask == 255, 0, mask)]
        else:
            image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        rows["id"].append(f"img_{seed}_{index}")
        rows["image"].append(encode(image, fmt))
        rows["mask"].append(encode_mask(mask))
        rows["target"].append(encode_mask(np.where(mask == 255, 255, (mask + 1) % (K + 1)).astype(np.uint8)))
        present = np.unique(mask[(mask > 0) & (mask < 255)])
        rows["labels"].append(present.astype(np.int16))
        rows["height"].append(height)
        rows["width"].append(width)
    batch = {}
    for key, values in rows.items():
        batch[key] = np.empty(len(values), dtype=object)  # one object per row, as Ray Data gives
        for row, value in enumerate(values):
            batch[key][row] = value
    batch["height"] = np.asarray(rows["height"], dtype=np.int32)
    batch["width"] = np.asarray(rows["width"], dtype=np.int32)
    return batch


def subset(batch: dict, rows: list[int]) -> dict:
    return {key: value[rows] for key, value in batch.items()}


ALL_VIEWS = frozenset({"strong", "mask", "target"})


def test_shapes_dtypes_and_labels():
    batch = make_batch()
    out = TrainTransform(AugmentConfig(crop_size=48, views=ALL_VIEWS), K)(batch)
    expected = {"image": (np.uint8, (3, 3, 48, 48)), "strong": (np.uint8, (3, 3, 48, 48)),
                "valid": (np.bool_, (3, 48, 48)),
                "mask": (np.uint8, (3, 48, 48)), "target": (np.uint8, (3, 48, 48)),
                "labels": (np.float32, (3, K))}
    assert {key: (value.dtype.type, value.shape) for key, value in out.items()} == expected
    for row, labels in enumerate(batch["labels"]):
        assert np.flatnonzero(out["labels"][row]).tolist() == [label - 1 for label in labels]


def test_only_requested_views_are_made():
    out = TrainTransform(AugmentConfig(crop_size=32), K)(make_batch())
    assert set(out) == {"image", "labels", "valid"}


def test_padding_is_invalid_zero_and_ignored():
    # No rescale and a crop larger than every image: the valid area is the whole image.
    config = AugmentConfig(crop_size=80, scale_range=(1.0, 1.0), views=ALL_VIEWS)
    batch = make_batch()
    out = TrainTransform(config, K)(batch)
    for row in range(3):
        valid = out["valid"][row]
        assert valid.sum() == batch["height"][row] * batch["width"][row]
        ys, xs = np.nonzero(valid)  # the valid region is one rectangle
        assert valid[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
        for key in ("image", "strong"):
            assert (out[key][row][:, ~valid] == 0).all()
        assert (out["mask"][row][~valid] == 255).all()
        assert (out["target"][row][~valid] == 255).all()


def test_crop_smaller_than_image_is_all_valid():
    config = AugmentConfig(crop_size=16, scale_range=(1.0, 1.0))
    assert TrainTransform(config, K)(make_batch())["valid"].all()


def test_image_and_masks_share_geometry_under_random_scale_flip_crop():
    """The image is the mask drawn in colours; wherever a pixel is inside a uniform
    region (so bilinear resampling cannot blend classes), its colour names its class."""
    config = AugmentConfig(crop_size=40, scale_range=(0.6, 1.6), color_jitter=0.0, hue_jitter=0.0,
                           views=ALL_VIEWS)
    checked = 0
    for seed in range(4):
        batch = make_batch(colour_coded=True, seed=seed)
        out = TrainTransform(config, K)(batch, epoch=seed)
        for row in range(3):
            mask, image = out["mask"][row], out["image"][row].transpose(1, 2, 0).astype(int)
            interior = np.ones_like(mask, dtype=bool)
            for dy in (-1, 0, 1):  # same class in the 3x3 neighbourhood, and not void
                for dx in (-1, 0, 1):
                    interior &= np.roll(mask, (dy, dx), axis=(0, 1)) == mask
            interior &= (mask != 255) & out["valid"][row]
            interior[[0, -1], :] = interior[:, [0, -1]] = False
            colours = PALETTE[mask[interior]].astype(int)
            assert np.abs(image[interior] - colours).max() <= 2
            target = out["target"][row]
            assert (target[interior] == (mask[interior] + 1) % (K + 1)).all()
            checked += interior.sum()
    assert checked > 1000


def test_masks_are_resampled_nearest_only():
    config = AugmentConfig(crop_size=48, scale_range=(0.37, 2.3), views={"mask", "target"})
    batch = make_batch()
    out = TrainTransform(config, K)(batch)
    for key in ("mask", "target"):
        sources = set(np.unique(np.concatenate([np.asarray(Image.open(io.BytesIO(b))).ravel()
                                                for b in batch[key]])).tolist())
        assert set(np.unique(out[key]).tolist()) <= sources | {255}


def test_strong_equals_weak_without_its_extra_ops():
    """The strong view is the weak view plus photometric ops: with none, identical."""
    config = AugmentConfig(crop_size=40, scale_range=(0.5, 1.5), strong_ops=0, blur_sigma=(0.0, 0.0),
                           views={"strong"})
    out = TrainTransform(config, K)(make_batch(fmt="JPEG"))
    np.testing.assert_array_equal(out["strong"], out["image"])


def test_strong_view_differs_in_colour_only():
    config = AugmentConfig(crop_size=40, views={"strong"})
    out = TrainTransform(config, K)(make_batch(fmt="JPEG"))
    assert not np.array_equal(out["strong"], out["image"])
    for row in range(3):
        assert (out["strong"][row][:, ~out["valid"][row]] == 0).all()


@pytest.mark.parametrize("name", sorted(RANDAUGMENT_OPS))
def test_randaugment_ops_move_no_pixel(name):
    """Pointwise colour ops commute with any pixel permutation; the two filters
    (sharpness, blur) have symmetric kernels, so they commute with a mirror."""
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    op = RANDAUGMENT_OPS[name]
    for magnitude in (0.0, 0.3, 1.0):
        result = np.asarray(op(Image.fromarray(array), magnitude))
        assert result.shape == array.shape and result.dtype == np.uint8
        if name == "sharpness":
            mirrored = np.asarray(op(Image.fromarray(array[:, ::-1].copy()), magnitude))
            np.testing.assert_array_equal(mirrored, result[:, ::-1])
            continue
        order = rng.permutation(24 * 24)
        shuffled = array.reshape(-1, 3)[order].reshape(24, 24, 3)
        permuted = np.asarray(op(Image.fromarray(shuffled), magnitude))
        np.testing.assert_array_equal(permuted, result.reshape(-1, 3)[order].reshape(24, 24, 3))


def test_blur_and_jitter_move_no_pixel():
    rng = np.random.default_rng(2)
    array = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
    blurred = np.asarray(gaussian_blur(Image.fromarray(array), np.random.default_rng(0), (1.5, 1.5)))
    mirrored = np.asarray(gaussian_blur(Image.fromarray(array[:, ::-1].copy()), np.random.default_rng(0), (1.5, 1.5)))
    np.testing.assert_array_equal(mirrored, blurred[:, ::-1])
    order = rng.permutation(24 * 24)
    shuffled = array.reshape(-1, 3)[order].reshape(24, 24, 3)
    jittered = np.asarray(color_jitter(Image.fromarray(array), np.random.default_rng(3), 0.4, 0.1))
    permuted = np.asarray(color_jitter(Image.fromarray(shuffled), np.random.default_rng(3), 0.4, 0.1))
    np.testing.assert_array_equal(permuted, jittered.reshape(-1, 3)[order].reshape(24, 24, 3))


def reference_jitter(pixels: np.ndarray, rng: np.random.Generator, strength: float, hue: float) -> np.ndarray:
    """The four jitter operations one after another, pixel by pixel, from their definitions."""
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, size=3)
    turns = rng.uniform(-hue, hue)
    order = rng.permutation(4)
    image = pixels.astype(np.float64)
    luma = np.array([0.299, 0.587, 0.114])
    angle = 2 * np.pi * turns
    for op in order:
        if op == 1:  # contrast: blend with the mean grey of the image as it is now
            mean_grey = np.mean([luma @ image[y, x] for y in range(image.shape[0]) for x in range(image.shape[1])])
        for y in range(image.shape[0]):
            for x in range(image.shape[1]):
                p = image[y, x]
                if op == 0:
                    image[y, x] = brightness * p
                elif op == 1:
                    image[y, x] = contrast * p + (1 - contrast) * mean_grey
                elif op == 2:
                    image[y, x] = saturation * p + (1 - saturation) * (luma @ p)
                else:  # rotate about the grey axis: grey part kept, chroma part turned
                    grey = np.full(3, p.mean())
                    chroma = p - grey
                    axis = np.ones(3) / np.sqrt(3)
                    image[y, x] = grey + np.cos(angle) * chroma + np.sin(angle) * np.cross(axis, chroma)
    return np.clip(np.floor(image + 0.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_color_jitter_equals_the_operations_in_sequence(seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(9, 7, 3), dtype=np.uint8)
    fast = np.asarray(color_jitter(Image.fromarray(pixels), np.random.default_rng(seed), 0.3, 0.1)).astype(int)
    slow = reference_jitter(pixels, np.random.default_rng(seed), 0.3, 0.1).astype(int)
    assert np.abs(fast - slow).max() <= 1  # float32 vs float64 rounding at .5


def test_hue_rotation_keeps_grey():
    grey = np.full((4, 4, 3), 128, dtype=np.uint8)
    rotated = color_jitter(Image.fromarray(grey), np.random.default_rng(0), 0.0, 0.5)
    np.testing.assert_array_equal(np.asarray(rotated), grey)


def test_model_inputs_normalise_with_imagenet_statistics_zero_padding_and_keep_raw():
    import torch

    from wsss.platform.loop import model_inputs

    config = AugmentConfig(crop_size=80, views={"strong", "mask"})  # larger than the images: padding
    out = TrainTransform(config, K)(make_batch())
    inputs = model_inputs({key: torch.from_numpy(value) for key, value in out.items()}, torch.device("cpu"))
    raw = out["image"].transpose(0, 2, 3, 1)  # channels last, un-normalised (csrm's CRF input)
    assert inputs["raw"].dtype == torch.uint8 and np.array_equal(inputs["raw"].numpy(), raw)
    valid = out["valid"]
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    expected = (raw.astype(np.float64) - mean) / std
    image = inputs["image"].numpy().transpose(0, 2, 3, 1)
    assert inputs["image"].dtype == torch.float32 and (~valid).any()
    np.testing.assert_allclose(image[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert (image[~valid] == 0).all() and (inputs["strong"].numpy().transpose(0, 2, 3, 1)[~valid] == 0).all()
    assert inputs["mask"].dtype == torch.int64 and torch.equal(inputs["mask"], torch.from_numpy(out["mask"]).long())


def test_deterministic_per_sample_seed_and_epoch():
    config = AugmentConfig(crop_size=40, views=ALL_VIEWS, seed=7)
    batch = make_batch(fmt="JPEG")
    first, again = TrainTransform(config, K)(batch, epoch=2), TrainTransform(config, K)(batch, epoch=2)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    # A row's augmentation does not depend on which rows share its batch.
    alone = TrainTransform(config, K)(subset(batch, [2]), epoch=2)
    for key in first:
        np.testing.assert_array_equal(first[key][2:3], alone[key])
    other_epoch = TrainTransform(config, K)(batch, epoch=3)
    other_seed = TrainTransform(AugmentConfig(crop_size=40, views=ALL_VIEWS, seed=8), K)(batch, epoch=2)
    assert not np.array_equal(first["image"], other_epoch["image"])
    assert not np.array_equal(first["image"], other_seed["image"])


def test_flip_and_scale_vary_across_epochs():
    config = AugmentConfig(crop_size=80, scale_range=(0.5, 1.5))
    batch = make_batch(sizes=((40, 56),))
    areas = {int(TrainTransform(config, K)(batch, epoch=e)["valid"].sum()) for e in range(8)}
    assert len(areas) > 4


def test_eval_transform_keeps_original_pixels():
    batch = make_batch(fmt="JPEG")
    out = EvalTransform(K)(batch)
    assert list(out["id"]) == list(batch["id"])
    for row in range(3):
        expected = np.asarray(Image.open(io.BytesIO(batch["image"][row])).convert("RGB"))
        np.testing.assert_array_equal(out["image"][row], expected)
        np.testing.assert_array_equal(out["mask"][row], np.asarray(Image.open(io.BytesIO(batch["mask"][row]))))
        assert out["mask"][row].dtype == np.uint8 and out["image"][row].dtype == np.uint8
    assert out["labels"].dtype == np.float32 and out["labels"].shape == (3, K)
    assert "mask" not in EvalTransform(K, with_mask=False)(subset(batch, [0]))


def test_corrupt_image_names_the_id():
    batch = make_batch(fmt="JPEG")
    batch["image"][1] = batch["image"][1][:40]
    with pytest.raises(DataError, match="img_0_1.*cannot be decoded"):
        TrainTransform(AugmentConfig(crop_size=32), K)(batch)
    with pytest.raises(DataError, match="img_0_1"):
        EvalTransform(K)(batch)


def test_bad_rows_name_the_id_and_problem():
    batch = make_batch()
    batch["labels"][2] = np.array([1, K + 1], dtype=np.int16)
    with pytest.raises(DataError, match=f"img_0_2.*label {K + 1} outside"):
        TrainTransform(AugmentConfig(crop_size=32), K)(batch)
    batch = make_batch()
    batch["mask"][0] = None
    with pytest.raises(DataError, match="img_0_0.*no mask"):
        TrainTransform(AugmentConfig(crop_size=32, views={"mask"}), K)(batch)
    batch = make_batch()
    batch["mask"][0] = encode_mask(np.zeros((5, 5), np.uint8))
    with pytest.raises(DataError, match="img_0_0.*mask is 5x5 but the image is 40x56"):
        EvalTransform(K)(batch)
    batch = make_batch()
    batch["height"][1] = 63
    with pytest.raises(DataError, match="img_0_1.*shard says 63x48"):
        TrainTransform(AugmentConfig(crop_size=32), K)(batch)
    batch = make_batch()
    del batch["target"]
    with pytest.raises(DataError, match="target: column missing"):
        TrainTransform(AugmentConfig(crop_size=32, views={"target"}), K)(batch)


@pytest.mark.parametrize("options, message", [
    ({"views": {"weak"}}, "unknown view"),
    ({"crop_size": 0}, "crop_size"),
    ({"scale_range": (1.5, 0.5)}, "scale_range"),
    ({"flip_prob": 2.0}, "flip_prob"),
    ({"hue_jitter": 0.9}, "hue_jitter"),
    ({"blur_sigma": (2.0, 1.0)}, "blur_sigma"),
])
def test_config_errors_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**options)


def test_target_view_needs_pseudo_labels():
    with pytest.raises(ValueError, match="label_uri"):
        AugmentConfig(views={"target"}).for_labels(False)
    assert "target" in AugmentConfig().for_labels(True).views


def test_a_16_bit_image_in_a_shard_is_refused_not_clipped():
    """Shards that `wsss prepare` did not check (written by other tools): the mode alone
    tells, so the check costs nothing per step."""
    from wsss.datasets.augment import decode_image

    buffer = io.BytesIO()
    Image.fromarray((np.arange(80, dtype=np.uint16) * 800).reshape(8, 10)).save(buffer, format="PNG")
    with pytest.raises(DataError, match="unsupported image: mode I;16") as error:
        decode_image(buffer.getvalue(), "img-16bit", 8, 10)
    assert error.value.path == "img-16bit"
