"""The batched augmentation draws what the per-sample torchvision recipe draws.

Three layers of evidence: (1) given the same parameters, a batch comes out pixel for pixel as
torchvision's functional ops make it; (2) each parameter is drawn from the distribution
torchvision's transform objects draw it from (two-sample Kolmogorov-Smirnov distances); (3) end
to end, image statistics over 512 augmentations of one photo agree with the real per-sample
``build_train_transform``, and the same comparison tells a mis-configured recipe apart.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from skinml.data.transforms import AugmentConfig, ImageConfig, build_train_transform
from skinml.training.augment import BRIGHTNESS, CONTRAST, HUE, SATURATION, AugmentParams, BatchAugment

RECIPE = AugmentConfig()  # the original recipe: 257 -> 224, the values of the status report
FULL = ImageConfig(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
# The distribution tests run at a small size so that 512 per-sample augmentations stay cheap;
# 72 -> 64 keeps the recipe's crop slack ratio (257 / 224).
SMALL = ImageConfig(image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SMALL_RECIPE = AugmentConfig(resize=72)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Hundreds of tiny per-sample ops: on a shared 2-core machine a second intra-op thread
    # only adds contention (10x slower measured under load), so run this module on one.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def photo(size: int) -> torch.Tensor:
    """A natural photo (scikit-image's cat), uint8 CHW, squashed to size x size."""
    from skimage.data import chelsea

    image = torch.from_numpy(np.ascontiguousarray(chelsea())).permute(2, 0, 1)
    return TF.resize(image, [size, size], antialias=True)


def ramps(size: int) -> torch.Tensor:
    """Red rises left to right, green top to bottom: the sign of each gradient shows the flips;
    blue is a one-pixel checkerboard, which blurring flattens. Values stay in 40..215, so no
    jitter can turn a pixel black: black means zero fill."""
    ramp = torch.linspace(40, 215, size)
    red = ramp.view(1, size).expand(size, size)
    green = ramp.view(size, 1).expand(size, size)
    cells = torch.arange(size)
    blue = 88.0 + 80.0 * ((cells.view(-1, 1) + cells.view(1, -1)) % 2)
    return torch.stack([red, green, blue]).round().to(torch.uint8)


def batched(augment: BatchAugment, image: torch.Tensor, n: int, seed: int, batch: int = 32):
    generator = torch.Generator().manual_seed(seed)
    outputs, params = [], []
    for _ in range(n // batch):
        p = augment.sample_params(batch, generator)
        outputs.append(augment.apply(image.expand(batch, -1, -1, -1).contiguous(), p))
        params.append(p)
    return torch.cat(outputs), params


def per_sample(image_config: ImageConfig, recipe: AugmentConfig, image: torch.Tensor, n: int, seed: int):
    transform = build_train_transform(image_config, recipe)
    torch.manual_seed(seed)
    return torch.stack([transform(image) for _ in range(n)])


# --- contract ----------------------------------------------------------------------------------


def test_output_shape_dtype_and_normalisation_on_cpu():
    augment = BatchAugment(SMALL, SMALL_RECIPE)
    images = torch.randint(0, 256, (5, 3, 72, 72), dtype=torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 64, 64) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.isfinite(out).all()
    # Normalised uint8 values: nothing outside what 0..255 maps to.
    low = (0 - torch.tensor(SMALL.mean)) / torch.tensor(SMALL.std)
    high = (1 - torch.tensor(SMALL.mean)) / torch.tensor(SMALL.std)
    assert (out.amin(dim=(0, 2, 3)) >= low - 1e-5).all() and (out.amax(dim=(0, 2, 3)) <= high + 1e-5).all()


def test_same_seed_same_batch_other_seed_other_batch():
    augment = BatchAugment(SMALL, SMALL_RECIPE)
    images = torch.randint(0, 256, (8, 3, 72, 72), dtype=torch.uint8)
    first = augment(images, torch.Generator().manual_seed(7))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(8)))
    # Successive batches from one generator differ: the generator advances.
    generator = torch.Generator().manual_seed(7)
    assert not torch.equal(augment(images, generator), augment(images, generator))


def test_input_is_checked_naming_the_expected_shape():
    augment = BatchAugment(SMALL, SMALL_RECIPE)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(TypeError, match="uint8"):
        augment(torch.rand(2, 3, 72, 72), generator)
    with pytest.raises(ValueError, match=r"\(B, 3, 72, 72\).*augment.resize=72, image_size=64.*\(2, 3, 64, 64\)"):
        augment(torch.zeros(2, 3, 64, 64, dtype=torch.uint8), generator)
    with pytest.raises(ValueError, match="blur_kernel"):
        BatchAugment(SMALL, AugmentConfig(resize=72, blur_kernel=4))


def test_resize_zero_takes_the_whole_photo_at_the_model_size():
    # augment.resize=0: the loader decodes at image_size (no crop); the batched path takes that
    # size and draws the same stream as resize=image_size, so the two spellings train identically.
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    zero = BatchAugment(SMALL, dataclasses.replace(SMALL_RECIPE, resize=0))
    same = BatchAugment(SMALL, dataclasses.replace(SMALL_RECIPE, resize=64))
    assert zero.input_size == 64
    assert torch.equal(zero(images, torch.Generator().manual_seed(3)), same(images, torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*augment.resize=0, image_size=64"):
        zero(torch.zeros(2, 3, 72, 72, dtype=torch.uint8), torch.Generator().manual_seed(0))


# --- (1) same parameters, same pixels ------------------------------------------------------------


def _torchvision_with(params: AugmentParams, image: torch.Tensor, i: int, config: ImageConfig) -> torch.Tensor:
    """torchvision's functional ops, in build_train_transform's order, with sample i's parameters."""
    size = config.image_size
    x = TF.crop(image, int(params.crop_top[i]), int(params.crop_left[i]), size, size)
    x = TF.horizontal_flip(x) if params.hflip[i] else x
    x = TF.vertical_flip(x) if params.vflip[i] else x
    for operation in params.jitter_order[i].tolist():
        if operation == BRIGHTNESS:
            x = TF.adjust_brightness(x, float(params.brightness[i]))
        elif operation == CONTRAST:
            x = TF.adjust_contrast(x, float(params.contrast[i]))
        elif operation == SATURATION:
            x = TF.adjust_saturation(x, float(params.saturation[i]))
        elif operation == HUE:
            x = TF.adjust_hue(x, float(params.hue[i]))
    x = TF.rotate(x, float(params.angle[i]))
    shift = [int(params.translate_x[i]), int(params.translate_y[i])]
    x = TF.affine(x, angle=0.0, translate=shift, scale=float(params.scale[i]), shear=[0.0, 0.0])
    if params.blur[i]:
        x = TF.gaussian_blur(x, [3, 3], [float(params.blur_sigma[i])] * 2)
    x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(config.mean), list(config.std))
    if params.erase[i]:
        box = (int(params.erase_top[i]), int(params.erase_left[i]), int(params.erase_height[i]), int(params.erase_width[i]))
        x = TF.erase(x, *box, torch.tensor(0.0))
    return x


def test_given_the_same_parameters_the_batch_matches_torchvision_pixel_for_pixel():
    augment = BatchAugment(FULL, RECIPE)
    n = 12
    images = torch.stack([photo(257), photo(257).flip(-1), ramps(257)] * 4)
    params = augment.sample_params(n, torch.Generator().manual_seed(3))
    # Exercise the rarer branches on known samples.
    params.blur[:] = torch.arange(n) % 2 == 0
    params.erase[:] = torch.arange(n) % 3 == 0
    assert params.erase.any() and params.hflip.any() and params.vflip.any() and (params.angle.abs() > 5).any()
    out = augment.apply(images, params)
    reference = torch.stack([_torchvision_with(params, images[i], i, FULL) for i in range(n)])
    differs = (out - reference).abs() > 1e-5
    # Only nearest-neighbour ties (rounding at exactly half a pixel) may go the other way.
    assert differs.float().mean() < 1e-3
    assert (out - reference).abs().max() < 1.0  # and no grossly wrong pixel anywhere


# --- (2) each parameter drawn from torchvision's distribution ---------------------------------------


def ks_distance(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two CDFs."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b))))


N_PARAMS = 4000
KS_LIMIT = 0.05  # the 0.1% critical value for 4000 vs 4000 draws is 1.95 * sqrt(2 / 4000) = 0.044


@pytest.fixture(scope="module")
def drawn():
    """N_PARAMS parameter sets from each side: BatchAugment, and torchvision's transforms."""
    ours = BatchAugment(FULL, RECIPE).sample_params(N_PARAMS, torch.Generator().manual_seed(11))
    torch.manual_seed(12)
    cached = [torch.zeros(3, 257, 257, dtype=torch.uint8)]
    cropped = [torch.zeros(3, 224, 224, dtype=torch.uint8)]
    a = RECIPE
    crop, rotation = v2.RandomCrop(224), v2.RandomRotation(a.rotation)
    affine = v2.RandomAffine(degrees=0, translate=(a.translate, a.translate), scale=a.scale)
    jitter = v2.ColorJitter(a.brightness, a.contrast, a.saturation, a.hue)
    blur, erasing = v2.GaussianBlur(a.blur_kernel), v2.RandomErasing(p=1.0)
    rows = []
    for _ in range(N_PARAMS):
        c, r, f, j = crop.make_params(cached), rotation.make_params(cropped), affine.make_params(cropped), jitter.make_params([])
        e = erasing.make_params(cropped)
        rows.append({
            "crop_top": c["top"], "crop_left": c["left"], "angle": r["angle"],
            "translate_x": f["translate"][0], "translate_y": f["translate"][1], "scale": f["scale"],
            "brightness": j["brightness_factor"], "contrast": j["contrast_factor"],
            "saturation": j["saturation_factor"], "hue": j["hue_factor"], "first_jitter": int(j["fn_idx"][0]),
            "blur_sigma": blur.make_params(cropped)["sigma"][0],
            "erase_fits": e["v"] is not None, "erase_height": e["h"], "erase_width": e["w"],
            "erase_top": e["i"], "erase_left": e["j"],
        })
    theirs = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    return ours, theirs


@pytest.mark.parametrize(
    "name",
    ["crop_top", "crop_left", "angle", "translate_x", "translate_y", "scale", "brightness", "contrast",
     "saturation", "hue", "blur_sigma"],
)
def test_each_parameter_follows_torchvision_distribution(drawn, name):
    ours, theirs = drawn
    mine = getattr(ours, name).numpy()
    assert ks_distance(mine, theirs[name]) < KS_LIMIT
    # Same support: integers where torchvision draws integers, and the same extremes.
    assert np.all(mine == np.round(mine)) == np.all(theirs[name] == np.round(theirs[name]))
    assert abs(mine.min() - theirs[name].min()) <= 0.02 * (theirs[name].max() - theirs[name].min())
    assert abs(mine.max() - theirs[name].max()) <= 0.02 * (theirs[name].max() - theirs[name].min())


def test_discrete_parameters_have_the_recipe_ranges(drawn):
    ours, _ = drawn
    slack = RECIPE.resize - FULL.image_size
    assert set(ours.crop_top.tolist()) == set(range(slack + 1)) == set(ours.crop_left.tolist())
    shift = round(RECIPE.translate * FULL.image_size)  # round(22.4) = 22 pixels
    assert set(ours.translate_x.tolist()) == set(range(-shift, shift + 1))
    assert ours.translate_x.dtype == torch.long


def test_coin_flips_happen_at_the_recipe_rates(drawn):
    ours, theirs = drawn
    tolerance = 4 * math.sqrt(0.25 / N_PARAMS)  # four binomial standard errors
    assert abs(ours.hflip.float().mean() - RECIPE.hflip) < tolerance
    assert abs(ours.vflip.float().mean() - RECIPE.vflip) < tolerance
    assert abs(ours.blur.float().mean() - RECIPE.blur_p) < tolerance
    fits = theirs["erase_fits"].mean()  # torchvision erases only when a box fits in 10 attempts
    assert abs(ours.erase.float().mean() - RECIPE.erasing_p * fits) < tolerance
    assert (ours.hflip & ours.vflip).float().mean() == pytest.approx(0.25, abs=tolerance)  # independent
    # Every jitter operation comes first a quarter of the time, as with torch.randperm(4).
    for operation in range(4):
        share = (ours.jitter_order[:, 0] == operation).float().mean()
        assert abs(share - 0.25) < tolerance and abs((theirs["first_jitter"] == operation).mean() - 0.25) < tolerance
    assert all(sorted(row) == [0, 1, 2, 3] for row in ours.jitter_order.tolist())


def test_erasing_boxes_follow_torchvision_distribution(drawn):
    ours, theirs = drawn
    size = FULL.image_size
    fitted = theirs["erase_fits"]
    # Where erasing is drawn, its box; compare on boxes that fit (ours: all drawn rows fit).
    box = {key: getattr(ours, key)[ours.erase].numpy() for key in ("erase_height", "erase_width", "erase_top", "erase_left")}
    area = box["erase_height"] * box["erase_width"] / size**2
    assert area.min() >= 0.015 and area.max() <= 0.35  # scale (0.02, 0.33) after rounding the sides
    assert (box["erase_top"] + box["erase_height"] <= size).all() and (box["erase_left"] + box["erase_width"] <= size).all()
    their_area = theirs["erase_height"][fitted] * theirs["erase_width"][fitted] / size**2
    # ~800 erased rows on our side: the 0.1% critical value is ~0.075.
    assert ks_distance(area, their_area) < 0.08
    assert ks_distance(box["erase_top"], theirs["erase_top"][fitted]) < 0.08


# --- (3) end to end: the per-sample pipeline and the batch agree on image statistics ---------------


N_IMAGES = 512


def summaries(outputs: torch.Tensor, config: ImageConfig) -> dict[str, torch.Tensor]:
    """Per-sample statistics that each augmentation moves."""
    fill = ((0 - torch.tensor(config.mean)) / torch.tensor(config.std)).view(1, 3, 1, 1)
    half = outputs.shape[-1] // 2
    return {
        **{f"mean_{c}": outputs[:, c].mean(dim=(1, 2)) for c in range(3)},  # brightness, hue, fill
        **{f"std_{c}": outputs[:, c].std(dim=(1, 2)) for c in range(3)},  # contrast, saturation
        "zero_fill": ((outputs - fill).abs() < 1e-6).all(dim=1).float().mean(dim=(1, 2)),  # rotation, affine
        "erased": (outputs == 0).all(dim=1).float().mean(dim=(1, 2)),
        "sharpness": (outputs[:, 2, :, 1:] - outputs[:, 2, :, :-1]).abs().mean(dim=(1, 2)),  # blur
        "hflipped": (outputs[:, 0, :, :half].mean(dim=(1, 2)) > outputs[:, 0, :, half:].mean(dim=(1, 2))).float(),
        "vflipped": (outputs[:, 1, :half].mean(dim=(1, 2)) > outputs[:, 1, half:].mean(dim=(1, 2))).float(),
    }


def disagreements(a: dict, b: dict) -> list[str]:
    """Statistics whose means differ by more than 4.5 standard errors (or whose spread differs)."""
    out = []
    for key in a:
        x, y = a[key].double(), b[key].double()
        error = math.sqrt(x.var() / len(x) + y.var() / len(y)) + 1e-9
        if abs(x.mean() - y.mean()) > 4.5 * error:
            out.append(f"{key}: mean {x.mean():.4f} vs {y.mean():.4f}")
        if x.std() > 1e-6 and not 0.8 < float(x.std() / (y.std() + 1e-12)) < 1.25:
            out.append(f"{key}: spread {x.std():.4f} vs {y.std():.4f}")
    return out


@pytest.fixture(scope="module")
def reference_statistics():
    image = ramps(SMALL_RECIPE.resize)
    return image, summaries(per_sample(SMALL, SMALL_RECIPE, image, N_IMAGES, seed=0), SMALL)


def test_batched_and_per_sample_paths_give_the_same_image_statistics(reference_statistics):
    image, reference = reference_statistics
    outputs, params = batched(BatchAugment(SMALL, SMALL_RECIPE), image, N_IMAGES, seed=1)
    ours = summaries(outputs, SMALL)
    assert disagreements(ours, reference) == []
    # The flip detector reads the true flips of the batch, so the rates above are flip rates.
    hflip = torch.cat([p.hflip for p in params]).float()
    assert torch.equal(ours["hflipped"], hflip)
    assert abs(reference["hflipped"].mean() - 0.5) < 0.1 and abs(reference["vflipped"].mean() - 0.5) < 0.1
    assert 0.1 < (reference["erased"] > 0).float().mean() < 0.3  # erasing p=0.2 on both sides
    assert 0.1 < (ours["erased"] > 0).float().mean() < 0.3


@pytest.mark.parametrize(
    "wrong",
    [
        {"rotation": 40.0},
        {"brightness": 0.0, "contrast": 0.0},
        {"hflip": 0.0},
        {"blur_p": 0.8},
        {"erasing_p": 0.0},
        {"scale": (1.0, 1.2)},
    ],
    ids=lambda w: ",".join(w),
)
def test_the_comparison_detects_a_recipe_that_differs(reference_statistics, wrong):
    # Guards the test above: with one setting changed, the same comparison must fail.
    image, reference = reference_statistics
    changed = AugmentConfig(**{**SMALL_RECIPE.__dict__, **wrong})
    outputs, _ = batched(BatchAugment(SMALL, changed), image, N_IMAGES, seed=1)
    assert disagreements(summaries(outputs, SMALL), reference) != []
