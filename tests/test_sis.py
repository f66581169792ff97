"""BackSelect and GradientBackSelect against straightforward implementations; SIS and keep-mask helpers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from overinterp.sis import (BackSelect, BackSelectResult, GradientBackSelect, keep_last, kept_count, sis_mask,
                            sis_size)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.usefixtures("one_thread")


class IgnorePixels(nn.Module):
    """Multiplies the input by a fixed 0/1 pixel mask: masking an ignored pixel changes nothing (exact ties)."""

    def __init__(self, ignored: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", (~ignored).double()[None, None])

    def forward(self, x):
        return x * self.keep.to(x.dtype)


def small_model(seed: int, height: int, width: int, ignore_fraction: float = 0.0, classes: int = 4) -> nn.Module:
    """A random conv net with batch norm (eval statistics) and, optionally, pixels it cannot see."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    if ignore_fraction:
        layers.append(IgnorePixels(torch.rand(height, width, generator=g) < ignore_fraction))
    layers += [nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 3, stride=2, padding=1),
               nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, classes)]
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net.double().eval()


def reference_backselect(model, image, baseline=0.0, target=None):
    """The algorithm as written: one image, evaluate every remaining pixel, remove the argmax (first on ties).

    Returns order, values, target, full confidence, and how many steps had a tied maximum."""
    c, h, w = image.shape
    with torch.no_grad():
        probs = model(image[None]).softmax(1)[0]
        t = int(probs.argmax()) if target is None else int(target)
        current = image.clone().reshape(c, h * w)
        remaining = list(range(h * w))
        order, values, ties = [], [], 0
        while remaining:
            candidates = current.repeat(len(remaining), 1, 1)
            for i, p in enumerate(remaining):
                candidates[i, :, p] = baseline
            f = model(candidates.reshape(-1, c, h, w)).softmax(1)[:, t].numpy()
            best = int(np.argmax(f))
            ties += int((f == f[best]).sum() > 1)
            p = remaining.pop(best)
            current[:, p] = baseline
            order.append(p)
            values.append(f[best])
    return np.array(order), np.array(values), t, float(probs[t]), ties


def reference_gradient(model, image, k, baseline=0.0):
    """Gradient BackSelect of one image, written out step by step with Python sorting."""
    c, h, w = image.shape
    mask = torch.zeros(1, 1, h, w, dtype=image.dtype)
    with torch.no_grad():
        t = int(model(image[None]).softmax(1).argmax())
    order, values = [], []
    removed: set[int] = set()
    while len(removed) < h * w:
        m = mask.clone().requires_grad_()
        f = model(image[None] * (1 - m) + baseline * m).softmax(1)[0, t]
        (g,) = torch.autograd.grad(f, m)
        g = g.flatten().tolist()
        present = [p for p in range(h * w) if p not in removed]
        chosen = sorted(present, key=lambda p: (-g[p], p))[:k]
        for p in chosen:
            removed.add(p)
            mask[0, 0, p // w, p % w] = 1
        with torch.no_grad():
            after = float(model(image[None] * (1 - mask) + baseline * mask).softmax(1)[0, t])
        order += chosen
        values += [after] * len(chosen)
    return np.array(order), np.array(values), t


def check_against_reference(model, images, batch_size, baseline=0.0, device="cpu", target=None):
    engine = BackSelect(model.to(device), baseline=baseline, batch_size=batch_size, dtype=torch.float64,
                        progress=False)
    result = engine.attribute(images.to(device), target)
    model.cpu()
    ties = 0
    for b in range(len(images)):
        order, values, t, full, tied = reference_backselect(model, images[b], baseline,
                                                            None if target is None else target[b])
        ties += tied
        np.testing.assert_array_equal(result.order[b], order)
        np.testing.assert_allclose(result.values[b], values, rtol=0, atol=1e-12)
        assert result.target[b] == t
        assert result.full_confidence[b] == pytest.approx(full, abs=1e-12)
    return result, ties


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_size", [2, 5, 35, 36, 100, 10_000])
def test_backselect_matches_reference_non_square(device, batch_size):
    model = small_model(0, 5, 7)
    images = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    check_against_reference(model, images, batch_size, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_backselect_contiguous_layout(device):
    model = small_model(2, 4, 5)
    images = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = BackSelect(model.to(device), batch_size=7, dtype=torch.float64, progress=False,
                        memory_format=torch.contiguous_format).attribute(images.to(device))
    expected, _ = check_against_reference(model, images, batch_size=7, device=device)
    np.testing.assert_array_equal(result.order, expected.order)


@pytest.mark.parametrize("device", DEVICES)
def test_backselect_exact_ties_go_to_the_lowest_index(device):
    model = small_model(3, 6, 6, ignore_fraction=0.4)
    images = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, ties = check_against_reference(model, images, batch_size=13, baseline=0.3, device=device)
    assert ties > 0, "the ignored pixels should produce exact ties"


def test_backselect_constant_model_removes_pixels_in_index_order():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = nn.Parameter(torch.tensor([0.2, 1.0, -0.5]))

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    result = BackSelect(Constant(), batch_size=7, progress=False).attribute(torch.randn(2, 3, 4, 3))
    np.testing.assert_array_equal(result.order, np.tile(np.arange(12), (2, 1)))
    np.testing.assert_array_equal(result.target, [1, 1])
    np.testing.assert_allclose(result.values, np.exp(1.0) / np.exp([0.2, 1.0, -0.5]).sum(), rtol=1e-6)


def test_backselect_follows_a_given_target():
    model = small_model(5, 4, 4)
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    result, _ = check_against_reference(model, images, batch_size=9, target=torch.tensor([2, 0]))
    np.testing.assert_array_equal(result.target, [2, 0])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), height=st.integers(1, 5), width=st.integers(1, 6),
       images=st.integers(1, 3), batch_size=st.integers(1, 40), ignore=st.sampled_from([0.0, 0.5]),
       baseline=st.sampled_from([0.0, -1.0]))
def test_backselect_property(seed, height, width, images, batch_size, ignore, baseline):
    model = small_model(seed, height, width, ignore_fraction=ignore)
    x = torch.randn(images, 3, height, width, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    check_against_reference(model, x, batch_size, baseline=baseline)


def test_backselect_iterator_yields_every_image_once():
    model = small_model(7, 3, 3)
    images = torch.randn(5, 3, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    engine = BackSelect(model, batch_size=4, dtype=torch.float64, progress=False)
    seen = [i for i, row in engine.attribute_iter(images)]
    assert sorted(seen) == list(range(5))
    whole = engine.attribute(images)
    for i, row in engine.attribute_iter(images):
        np.testing.assert_array_equal(row.order[0], whole.order[i])


def test_float32_copy_leaves_the_model_alone():
    model = small_model(9, 4, 4).float()
    BackSelect(model, dtype=torch.float64, progress=False).attribute(torch.randn(1, 3, 4, 4))
    assert next(model.parameters()).dtype == torch.float32


def test_bf16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="CUDA"):
        BackSelect(small_model(0, 2, 2), bf16=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k,batch_size", [(1, 2), (4, 3), (7, 1)])
def test_gradient_backselect_matches_reference(device, k, batch_size):
    model = small_model(11, 4, 5)
    images = torch.randn(3, 3, 4, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    result = GradientBackSelect(model.to(device), pixels_per_step=k, batch_size=batch_size, dtype=torch.float64,
                                progress=False).attribute(images.to(device))
    model.cpu()
    assert result.pixels_per_step == k
    for b in range(3):
        order, values, t = reference_gradient(model, images[b], k)
        np.testing.assert_array_equal(result.order[b], order)
        np.testing.assert_allclose(result.values[b], values, rtol=0, atol=1e-12)
        assert result.target[b] == t
    steps = result.removal_step()
    assert steps.max() == math.ceil(20 / k) - 1
    np.testing.assert_array_equal(np.take_along_axis(steps, result.order, 1)[0], np.arange(20) // k)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_the_step_form_keeps_what_the_subsets_and_sis_sizes_need(tmp_path, k):
    """Saved in its step form (each pixel's removal step, f after each step), a result reads back with the
    same steps, values, SIS sizes and subsets by steps; within a step the pixels come in index order."""
    from overinterp.sis import keep_last_steps, read_step_arrays, sis_size_of_steps

    model = small_model(11, 4, 5)
    images = torch.randn(3, 3, 4, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    result = GradientBackSelect(model, pixels_per_step=k, dtype=torch.float64, progress=False).attribute(images)
    result.meta = {"method": "gradient"}
    result.save(tmp_path / "steps.npz", steps=True)
    stored = np.load(tmp_path / "steps.npz")
    assert "order" not in stored and stored["removal_step"].dtype == np.uint16
    assert stored["step_values"].shape == (3, math.ceil(20 / k))
    back = BackSelectResult.load(tmp_path / "steps.npz")
    np.testing.assert_array_equal(back.removal_step(), result.removal_step())
    np.testing.assert_allclose(back.values, result.values, rtol=1e-6)
    assert back.meta == result.meta and (back.target == result.target).all()
    for b in range(3):  # index order within each step
        for step in range(back.num_steps):
            pixels = back.order[b, step * k:(step + 1) * k]
            assert (np.diff(pixels) > 0).all() and set(pixels) == set(result.order[b, step * k:(step + 1) * k])
    arrays = read_step_arrays([tmp_path / "steps.npz"], keys=("removal_step", "step_values", "full_confidence"))
    for tau in (0.3, 0.6, 0.9):
        expected = sis_size(result, tau)
        np.testing.assert_array_equal(sis_size(back, tau), expected)
        np.testing.assert_array_equal(
            sis_size_of_steps(arrays["step_values"], arrays["full_confidence"], 20, k, tau), expected)
    # By steps: the pixels of the last ceil(fraction * steps) steps, the same as keep_last for whole steps.
    steps = math.ceil(20 / k)
    kept = keep_last_steps(arrays["removal_step"], k, 0.5)
    whole_steps = math.ceil(0.5 * steps)
    assert (kept.sum(1) == 20 - (steps - whole_steps) * k).all()
    np.testing.assert_array_equal(kept, keep_last(result, n=20 - (steps - whole_steps) * k))
    # A result file in the order form reads the same way.
    result.save(tmp_path / "order.npz")
    again = read_step_arrays([tmp_path / "order.npz", tmp_path / "steps.npz"], keys=("removal_step",))
    np.testing.assert_array_equal(again["removal_step"], np.concatenate([result.removal_step()] * 2))


def test_gradient_with_one_pixel_per_step_on_a_linear_model_is_exact_backselect():
    """For f monotone in a linear score, the largest-gradient pixel is the one whose removal hurts f least."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16, 2)).double()
    images = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    exact = BackSelect(net, dtype=torch.float64, progress=False).attribute(images)
    gradient = GradientBackSelect(net, pixels_per_step=1, dtype=torch.float64, progress=False).attribute(images)
    np.testing.assert_array_equal(exact.order, gradient.order)
    np.testing.assert_allclose(exact.values, gradient.values, atol=1e-12)


def hand_made() -> BackSelectResult:
    """Two 2x3 images: f after each removal, orders chosen by hand."""
    return BackSelectResult(
        order=[[5, 0, 3, 1, 4, 2], [0, 1, 2, 3, 4, 5]],
        values=[[0.995, 0.993, 0.99, 0.98, 0.991, 0.5], [0.97, 0.96, 0.95, 0.94, 0.93, 0.92]],
        target=[1, 2], full_confidence=[0.999, 0.98], height=2, width=3,
    )


def test_sis_size_and_mask():
    r = hand_made()
    # Image 0: the last value >= 0.99 is at position 4 (0.991), so the SIS is the last pixel, 2.
    sizes = sis_size(r, 0.99)
    assert sizes[0] == 1 and np.isnan(sizes[1])
    masks = sis_mask(r, 0.99)
    assert masks[1] is None and masks[0].shape == (2, 3)  # shaped like the image
    np.testing.assert_array_equal(np.flatnonzero(masks[0]), [2])
    # At 0.992: last value >= 0.992 is position 1, so pixels removed after it: 3, 1, 4, 2.
    assert sis_size(r, 0.992)[0] == 4
    np.testing.assert_array_equal(np.flatnonzero(sis_mask(r, 0.992)[0]), [1, 2, 3, 4])
    # No removal keeps f >= 0.996: the SIS is the whole image; the all-masked value >= 0.4: empty SIS.
    assert sis_size(r, 0.996)[0] == 6 and sis_mask(r, 0.996)[0].all()
    assert sis_size(r, 0.4)[0] == 0 and not sis_mask(r, 0.4)[0].any()
    assert sis_size(r, 0.9).tolist() == [1, 0]


def reference_with_baseline(model, image, baseline, target=None):
    """Exact BackSelect of one image where a masked pixel p takes ``baseline[:, p]`` (C, H*W), written out."""
    c, h, w = image.shape
    with torch.no_grad():
        t = int(model(image[None]).softmax(1).argmax()) if target is None else target
        current, remaining, order = image.clone().reshape(c, h * w), list(range(h * w)), []
        while remaining:
            candidates = current.repeat(len(remaining), 1, 1)
            for i, p in enumerate(remaining):
                candidates[i, :, p] = baseline[:, p]
            best = int(np.argmax(model(candidates.reshape(-1, c, h, w)).softmax(1)[:, t].numpy()))
            p = remaining.pop(best)
            current[:, p] = baseline[:, p]
            order.append(p)
    return np.array(order), t


def test_baselines_as_a_scalar_per_channel_values_or_a_tensor():
    """Captum's forms of ``baselines``: each gives the ordering of BackSelect with masked pixels set to it."""
    model = small_model(21, 3, 4)
    images = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    engine = BackSelect(model, dtype=torch.float64, progress=False)
    per_image = torch.randn(2, 3, 3, 4, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    forms = {
        0.7: torch.full((3, 12), 0.7, dtype=torch.float64).expand(2, 3, 12),
        (0.1, -0.5, 0.3): torch.tensor([0.1, -0.5, 0.3], dtype=torch.float64).view(1, 3, 1).expand(2, 3, 12),
        "per image": per_image.reshape(2, 3, 12),
    }
    for form, expected in forms.items():
        given = per_image if form == "per image" else torch.tensor(form, dtype=torch.float64)
        for method in (engine, GradientBackSelect(model, pixels_per_step=1, dtype=torch.float64, progress=False)):
            result = method.attribute(images, target=1, baselines=given)
            assert (result.target == 1).all()  # an int target is broadcast over the batch
            if isinstance(method, BackSelect):
                for b in range(2):
                    np.testing.assert_array_equal(result.order[b], reference_with_baseline(model, images[b],
                                                                                           expected[b], 1)[0])
    # The default is the engine's baseline; a scalar equal to it changes nothing.
    np.testing.assert_array_equal(engine.attribute(images, baselines=0.0).order, engine.attribute(images).order)
    with pytest.raises(ValueError, match="do not broadcast"):
        engine.attribute(images, baselines=torch.zeros(5))


def reference_features(model, image, features, target=None):
    """Exact BackSelect over features (groups of pixels masked together), written out: the feature order."""
    c = image.shape[0]
    ids = features.flatten()
    with torch.no_grad():
        t = int(model(image[None]).softmax(1).argmax()) if target is None else target
        current, remaining, order = image.clone().reshape(c, -1), sorted(set(ids.tolist())), []
        while remaining:
            f = []
            for feature in remaining:
                candidate = current.clone()
                candidate[:, ids == feature] = 0
                f.append(float(model(candidate.reshape(1, *image.shape)).softmax(1)[0, t]))
            feature = remaining.pop(int(np.argmax(f)))
            current[:, ids == feature] = 0
            order.append(feature)
    return order


def test_feature_mask_groups_pixels_into_features():
    """SIS over superpixels: features are removed whole, the result lists their pixels together."""
    model = small_model(31, 4, 6)
    images = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(32), dtype=torch.float64)
    blocks = (torch.arange(4).view(4, 1) // 2) * 10 + torch.arange(6).view(1, 6) // 2  # six 2x2 blocks, ids 0..21
    result = BackSelect(model, dtype=torch.float64, progress=False).attribute(images, feature_mask=blocks)
    assert result.meta["features"] == 6 and result.order.shape == (2, 24)
    flat = blocks.flatten().numpy()
    for b in range(2):
        removed = list(dict.fromkeys(flat[result.order[b]]))  # features in removal order
        assert removed == reference_features(model, images[b], blocks)
        for feature in removed:  # a feature's pixels are consecutive and share one value
            positions = np.flatnonzero(flat[result.order[b]] == feature)
            assert np.ptp(positions) == 3 and len(set(result.values[b, positions])) == 1
    mask = sis_mask(result, 0.0)[0]
    assert mask.shape == (4, 6)
    # On a linear model, the gradient over features with one feature per step is the exact ordering.
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 24, 2)).double()
    per_image = blocks.expand(2, 1, 4, 6)
    exact = BackSelect(linear, dtype=torch.float64, progress=False).attribute(images, feature_mask=per_image)
    gradient = GradientBackSelect(linear, pixels_per_step=1, dtype=torch.float64,
                                  progress=False).attribute(images, feature_mask=per_image)
    np.testing.assert_array_equal(exact.order, gradient.order)
    with pytest.raises(ValueError, match="integer feature ids"):
        BackSelect(model, progress=False).attribute(images, feature_mask=blocks.double())


class DictOutput(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return {"logits": self.net(x), "features": x.mean((2, 3))}


def test_models_with_dict_or_tuple_outputs_name_their_logits():
    model = small_model(41, 3, 3)
    images = torch.randn(2, 3, 3, 3, generator=torch.Generator().manual_seed(42), dtype=torch.float64)
    plain = BackSelect(model, dtype=torch.float64, progress=False).attribute(images)
    for select in ("logits", lambda out: out["logits"]):
        picked = BackSelect(DictOutput(model), dtype=torch.float64, progress=False,
                            select_output=select).attribute(images)
        np.testing.assert_array_equal(picked.order, plain.order)
    with pytest.raises(ValueError, match="returned dict.*select_output"):
        GradientBackSelect(DictOutput(model), dtype=torch.float64, progress=False).attribute(images)


def test_keep_last():
    r = hand_made()
    keep = keep_last(r, n=2)
    np.testing.assert_array_equal(np.flatnonzero(keep[0]), [2, 4])
    np.testing.assert_array_equal(np.flatnonzero(keep[1]), [4, 5])
    np.testing.assert_array_equal(keep_last(r, fraction=0.5), keep_last(r, n=3))
    assert not keep_last(r, n=0).any() and keep_last(r, fraction=1.0).all()
    assert kept_count(1024, 0.05) == 52 and kept_count(1000, 0.05) == 50 and kept_count(1024, 0.1) == 103
    with pytest.raises(ValueError):
        keep_last(r)


@pytest.mark.parametrize("side,dtype", [(32, np.uint16), (256, np.uint16), (299, np.int32)])
def test_save_and_load_compactly(tmp_path, side, dtype):
    rng = np.random.default_rng(0)
    pixels = side * side
    r = BackSelectResult(np.stack([rng.permutation(pixels) for _ in range(2)]), rng.random((2, pixels)),
                         [3, 4], [0.9, 0.8], side, side, pixels_per_step=10, index=[17, 5], meta={"method": "x"})
    r.save(tmp_path / "r.npz")
    with np.load(tmp_path / "r.npz") as z:
        assert z["order"].dtype == dtype and z["values"].dtype == np.float32
        assert {"index", "order", "values", "target", "full_confidence", "height", "width"} <= set(z.files)
    back = BackSelectResult.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.order, r.order)
    np.testing.assert_array_equal(back.index, [17, 5])
    np.testing.assert_allclose(back.values, r.values, rtol=1e-7)
    assert (back.height, back.width, back.pixels_per_step, back.meta) == (side, side, 10, {"method": "x"})


def test_iteration_does_not_leak_inference_mode():
    engine = BackSelect(small_model(14, 3, 3), batch_size=4, dtype=torch.float64, progress=False)
    images = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    for _ in engine.attribute_iter(images):
        assert not torch.is_inference_mode_enabled()


# ----------------------------------------------------------------------------------------------------------
# The incremental evaluator: the same orderings as full forwards, computing only the masked pixel's cone

from overinterp import incremental  # noqa: E402
from overinterp.models import build_model  # noqa: E402


def random_batch_norm(model: nn.Module, seed: int) -> nn.Module:
    """Eval statistics and affine parameters far from the identity, so that batch norm is really exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)
    return model.eval()


def orderings(model, images, evaluator, dtype=torch.float64, **kwargs):
    engine = BackSelect(model, dtype=dtype, progress=False, evaluator=evaluator, **kwargs)
    return engine.attribute(images), engine


def window_layers(forward: incremental.IncrementalForward) -> int:
    """Convolutions the evaluator computes on windows (a test that had none would prove nothing)."""
    return sum(forward.plans[n].state == "window" and forward.plans[n].op.kind == "conv" for n in forward.nodes)


@pytest.mark.parametrize("arch, size, crop", [("cifar_resnet20", 32, 32), ("cifar_resnet18", 32, 16),
                                              ("cifar_vgg16_bn", 32, 32)])
def test_incremental_logits_equal_full_forwards(arch, size, crop):
    """Option-A shortcuts (ResNet20), 1x1 projections (ResNet18), max pooling and a map shrinking to 1x1 (VGG):
    in float64 every candidate's logits equal a full forward's to rounding."""
    torch.manual_seed(0)
    model = random_batch_norm(build_model(arch), 1).double()
    forward = incremental.IncrementalForward(model, (3, crop, crop), 0.2, torch.float64, torch.device("cpu"))
    assert window_layers(forward) >= 3, "the test would not exercise windows"
    images = torch.randn(2, 3, crop, crop, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    images[1, :, :3] = 0.2  # masking these pixels changes nothing: they must all get the cached output exactly
    forward.ensure_capacity(2)
    forward.refresh(torch.arange(2), images)
    pixels = torch.cat([torch.randperm(crop * crop, generator=torch.Generator().manual_seed(3))[:14],
                        torch.tensor([0, crop - 1, crop * crop - 1, crop * 3 - 1, crop + 1])])  # corners and edges
    slots = torch.arange(len(pixels)) % 2
    got = forward.logits(slots, pixels)
    candidates = images[slots].clone()
    candidates.view(len(pixels), 3, -1)[torch.arange(len(pixels)), :, pixels] = 0.2
    with torch.no_grad():
        want = model(candidates)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-11)
    unchanged = (slots == 1) & (pixels < 3 * crop)
    assert unchanged.sum() >= 2
    assert torch.equal(got[unchanged], forward.outputs[1].expand(int(unchanged.sum()), -1))  # exact ties


@pytest.mark.parametrize("batch_size", [7, 1000])
def test_incremental_backselect_equals_full_forwards_resnet20(batch_size):
    model = random_batch_norm(build_model("cifar_resnet20"), 4).double()
    images = torch.randn(2, 3, 8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    got, engine = orderings(model, images, "incremental", batch_size=batch_size)
    want, _ = orderings(model, images, "full", batch_size=batch_size)
    assert window_layers(engine._plan((3, 8, 10))[0]) >= 2
    np.testing.assert_array_equal(got.order, want.order)
    np.testing.assert_allclose(got.values, want.values, rtol=0, atol=1e-12)
    assert got.meta["evaluator"].startswith("incremental") and want.meta["evaluator"].startswith("full")


@pytest.mark.parametrize("batch_size", [2, 13, 10_000])
def test_incremental_backselect_matches_reference_with_exact_ties(batch_size):
    """Ignored pixels tie exactly; the incremental evaluator must break the ties as the reference does."""
    model = small_model(3, 6, 6, ignore_fraction=0.4)
    images = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    result, _ = orderings(model, images, "incremental", baseline=0.3, batch_size=batch_size)
    ties = 0
    for b in range(len(images)):
        order, values, t, full, tied = reference_backselect(model, images[b], 0.3)
        ties += tied
        np.testing.assert_array_equal(result.order[b], order)
        np.testing.assert_allclose(result.values[b], values, rtol=0, atol=1e-12)
    assert ties > 0


@pytest.fixture(scope="module")
def trained_tiny(cifar_npz):
    """A network trained on real CIFAR-10 images (a few epochs): sparse, structured activations."""
    from overinterp.data import Normalizer, load_split
    from overinterp.train import Recipe, train_model

    train = load_split(cifar_npz, "train", 200)
    recipe = Recipe(epochs=3, batch_size=50, milestones=[2])
    model, _ = train_model("tiny", train, recipe, 0, Normalizer(), torch.device("cpu"), progress=False)
    images = Normalizer()(load_split(cifar_npz, "test", 10).images[:3, :, 8:24, 8:24])
    return model.eval(), images


def test_incremental_backselect_on_a_trained_model(trained_tiny):
    """float64: the same orderings as full forwards. float32: where an ordering differs at all, it is at a
    near-tie (both pixels leave f within 1e-5), and the values agree to float32 rounding."""
    model, images = trained_tiny
    got, _ = orderings(model, images.double(), "incremental", batch_size=256)
    want, _ = orderings(model, images.double(), "full", batch_size=256)
    np.testing.assert_array_equal(got.order, want.order)
    np.testing.assert_allclose(got.values, want.values, rtol=0, atol=1e-12)

    got32, _ = orderings(model, images, "incremental", dtype=torch.float32, batch_size=256)
    want32, _ = orderings(model, images, "full", dtype=torch.float32, batch_size=256)
    for b in range(len(images)):
        differ = np.flatnonzero(got32.order[b] != want32.order[b])
        if len(differ):
            step = differ[0]
            current = images[b].double().clone().view(3, -1)
            current[:, want32.order[b, :step]] = 0.0
            pair = current.repeat(2, 1, 1)
            pair[0, :, got32.order[b, step]] = pair[1, :, want32.order[b, step]] = 0.0
            with torch.no_grad():
                f = model.double()(pair.view(2, *images.shape[1:])).softmax(1)[:, want32.target[b]]
            model.float()
            assert abs(float(f[0] - f[1])) < 1e-5, f"ordering {b} differs at step {step}, not a near-tie: {f}"
        else:
            np.testing.assert_allclose(got32.values[b], want32.values[b], rtol=0, atol=1e-5)


class SqueezeExcite(nn.Module):
    """A global op inside the network: every position after it depends on every pixel."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x.mean((2, 3)))).unsqueeze(-1).unsqueeze(-1)


def test_models_with_global_ops_mix_windows_and_full_layers():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), SqueezeExcite(6),
                          nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    images = torch.randn(2, 3, 7, 9, dtype=torch.float64, generator=g)
    got, engine = orderings(model, images, "incremental", batch_size=17)
    want, _ = orderings(model, images, "full", batch_size=17)
    np.testing.assert_array_equal(got.order, want.order)
    np.testing.assert_allclose(got.values, want.values, rtol=0, atol=1e-12)
    forward = engine._plan((3, 7, 9))[0]
    states = [forward.plans[n].state for n in forward.nodes]
    assert "window" in states and states[-3:] == ["full"] * 3


class InputNorm(nn.Module):
    def forward(self, x):
        return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_model(0, 5, 5)

    def forward(self, x):
        return self.net(x) if x.sum() > 0 else -self.net(x)  # data-dependent: fx cannot trace it


def test_unsupported_models_fall_back_to_full_forwards():
    images = torch.randn(1, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    global_first = nn.Sequential(InputNorm(), small_model(0, 5, 5)).double()
    for model, reason in ((global_first, "no layer of it is local"), (Branchy().double(), "cannot be traced")):
        result, engine = orderings(model, images, "auto", batch_size=8)
        assert engine.evaluator_for((3, 5, 5)).startswith("full forwards") and reason in result.meta["evaluator"]
        np.testing.assert_array_equal(result.order, orderings(model, images, "full", batch_size=8)[0].order)
    with pytest.raises(ValueError, match="cannot be traced"):
        orderings(Branchy().double(), images, "incremental", batch_size=8)
    with pytest.raises(ValueError, match="bf16"):
        BackSelect(small_model(0, 5, 5), bf16=True, evaluator="incremental")
    with pytest.raises(ValueError, match="evaluator must be one of"):
        BackSelect(small_model(0, 5, 5), evaluator="fast")


def test_default_batch_size_and_evaluator_are_measured():
    model = small_model(1, 6, 6)
    engine = BackSelect(model, dtype=torch.float64, progress=False)
    chosen = engine.batch_size_for((3, 6, 6))
    from overinterp.sis import CANDIDATE_BATCH_SIZES

    assert chosen in CANDIDATE_BATCH_SIZES["cpu"]
    assert "measured" in engine.evaluator_for((3, 6, 6))
    images = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(engine.attribute(images).order,
                                  BackSelect(model, dtype=torch.float64, progress=False, batch_size=7).attribute(images).order)


@pytest.mark.parametrize("engine", [lambda m: BackSelect(m, progress=False, batch_size=9),
                                    lambda m: GradientBackSelect(m, pixels_per_step=4, progress=False)])
def test_the_callers_model_is_left_as_it_was(engine):
    """Mode, dtype, memory layout and weights: the engines work on a copy."""
    model = small_model(2, 6, 6).float().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strides = {k: v.stride() for k, v in model.state_dict().items()}
    engine(model).attribute(torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0)))
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert value.dtype == before[key].dtype and value.stride() == strides[key]
        assert torch.equal(value, before[key])


def test_incremental_dilated_grouped_strided_convolutions_and_pooling():
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2), nn.ReLU(),
                          nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=3), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.AvgPool2d(2), nn.Conv2d(6, 8, 1), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 5)).double()
    random_batch_norm(model, 8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    forward = incremental.IncrementalForward(model, (3, 32, 24), 0.0, torch.float64, torch.device("cpu"))
    assert window_layers(forward) >= 2
    image = torch.randn(1, 3, 32, 24, dtype=torch.float64, generator=g)
    forward.ensure_capacity(1)
    forward.refresh(torch.zeros(1, dtype=torch.long), image)
    pixels = torch.arange(0, 32 * 24, 7)
    got = forward.logits(torch.zeros(len(pixels), dtype=torch.long), pixels)
    batch = image.repeat(len(pixels), 1, 1, 1)
    batch.view(len(pixels), 3, -1)[torch.arange(len(pixels)), :, pixels] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(got, model(batch), rtol=0, atol=1e-11)
