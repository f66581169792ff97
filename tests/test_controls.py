"""The masking fills and the four controls of what backward-selection subsets mean."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import scipy.sparse.linalg
import torch

from overinterp.cli import main
from overinterp.controls import dilate, random_keep_like, swap, swap_partners, targeted
from overinterp.data import Normalizer, Split, load_split
from overinterp.fills import Fill, impute, noise_images
from overinterp.models import build_model, save_model
from overinterp.sis import BackSelect, GradientBackSelect
from overinterp.subsets import load_keep_masks, random_keep, save_keep_masks

pytestmark = pytest.mark.usefixtures("one_thread")


def road_reference(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """ROAD's linear imputation of one (H, W) channel, as a sparse system solved directly."""
    h, w = image.shape
    weights = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6, (0, 1): 1 / 6,
               (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}
    unknown = np.argwhere(~keep)
    number = {tuple(p): n for n, p in enumerate(unknown)}
    a = scipy.sparse.lil_matrix((len(unknown), len(unknown)))
    b = np.zeros(len(unknown))
    for n, (i, j) in enumerate(unknown):
        for (di, dj), weight in weights.items():
            q = (i + di, j + dj)
            if 0 <= q[0] < h and 0 <= q[1] < w:
                a[n, n] += weight
                if keep[q]:
                    b[n] += weight * image[q]
                else:
                    a[n, number[q]] -= weight
    out = image.copy()
    out[~keep] = scipy.sparse.linalg.spsolve(a.tocsr(), b)
    return out


def test_imputation_solves_roads_linear_system_from_the_kept_pixels_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    keep = torch.rand(3, 1, 16, 16) < 0.08
    filled = impute(x, keep, tolerance=1e-10)
    for i, c in ((0, 0), (2, 1)):
        np.testing.assert_allclose(filled[i, c].numpy(), road_reference(x[i, c].numpy(), keep[i, 0].numpy()),
                                   atol=1e-7)
    assert torch.equal(filled[keep.expand_as(x)], x[keep.expand_as(x)])  # kept pixels untouched
    other = torch.where(keep, x, torch.randn_like(x) * 50)  # whatever the masked pixels were
    torch.testing.assert_close(impute(other, keep, tolerance=1e-10), filled)
    # a warm start converges to the same solution
    torch.testing.assert_close(impute(x, keep, tolerance=1e-10, start=x), filled)


def test_fills_hide_the_masked_pixels_and_noise_has_the_data_statistics():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    keep = torch.rand(64, 1, 8, 8) < 0.1
    secret = torch.where(keep, x, x + 100)
    for kind in ("noise", "impute"):
        a, b = Fill(kind, seed=3)(x, keep), Fill(kind, seed=3)(secret, keep)
        torch.testing.assert_close(a, b)  # nothing of the masked values gets through
        assert torch.equal(a[keep.expand_as(x)], x[keep.expand_as(x)])
    noise = Fill("noise", seed=3)(x, keep)[~keep.expand_as(x)]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    mean = Fill("mean", baseline=0.25)(x, keep)
    assert torch.all(mean[~keep.expand_as(x)] == 0.25)
    # backward selection's noise: one image per dataset row, whichever batch draws it
    torch.testing.assert_close(noise_images([7, 9], (3, 8, 8), 1)[1], noise_images([9], (3, 8, 8), 1)[0])


def test_training_solves_the_imputation_once_and_shows_the_same_inputs():
    """Training reuses each image's imputation across epochs: the inputs are those of solving every batch."""
    from overinterp.data import Normalizer, model_inputs

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    keep = torch.rand(40, 1, 8, 8) < 0.2
    solved_once = Normalizer(fill=Fill("impute", seed=5)).imputations(images, keep, chunk=16)
    every_batch, reused = Normalizer(fill=Fill("impute", seed=5)), Normalizer(fill=Fill("impute", seed=5))
    for rows in (slice(0, 10), slice(10, 40)):  # equal to the solver's tolerance (it stops on a batch's residual)
        torch.testing.assert_close(model_inputs(every_batch, images[rows], keep[rows], False),
                                   model_inputs(reused, images[rows], keep[rows], False, solved_once[rows]),
                                   atol=1e-3, rtol=0)
    assert Normalizer().imputations(images, keep) is None  # the other fills have nothing to solve


def test_gradient_backward_selection_under_per_image_and_imputed_fills():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    x = torch.randn(6, 3, 32, 32)
    noise = noise_images(range(6), (3, 32, 32), 0)
    engine = GradientBackSelect(model, pixels_per_step=64, batch_size=4, progress=False)
    batched = engine.attribute(x, baselines=noise)
    one_by_one = [engine.attribute(x[i : i + 1], baselines=noise[i : i + 1]) for i in range(6)]
    assert all(np.array_equal(batched.order[i], r.order[0]) for i, r in enumerate(one_by_one))
    # the fill is what the model sees: the masked image's confidence matches a forward on it
    fill = Fill("impute", seed=0).for_rows(range(6), (3, 32, 32))
    result = engine.attribute(x, baselines=fill)
    keep = torch.ones(6, 1024, dtype=torch.bool)
    keep.scatter_(1, torch.from_numpy(result.order[:, :512]), False)
    keep = keep.view(6, 1, 32, 32)
    shown = torch.where(keep, x, impute(x, keep, tolerance=1e-3) + 0.01 * noise)
    probs = model(shown).softmax(1).gather(1, torch.from_numpy(result.target).view(-1, 1)).squeeze(1)
    np.testing.assert_allclose(result.values[:, 511], probs.detach().numpy(), atol=2e-3)
    with pytest.raises(ValueError, match="GradientBackSelect"):
        BackSelect(model, progress=False).attribute(x[:1], baselines=fill)


def test_dilation_adds_every_neighbour_and_random_masks_match_counts():
    keep = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    keep[0, 0, 2, 3] = True
    keep[1, 0, 0, 0] = True
    grown = dilate(keep)
    assert grown[0, 0, 1:4, 2:5].all() and grown[0].sum() == 9
    assert grown[1, 0, :2, :2].all() and grown[1].sum() == 4
    masks = random_keep_like(np.array([9, 4]), 6, 6, np.random.default_rng(0))
    assert masks.flatten(1).sum(1).tolist() == [9, 4]


class SpotModel(torch.nn.Module):
    """Class c's logit is 5x the sum of channel 0 over its own 2x2 spot: on an all-ones image every class
    ties, and any class wins once the other spots are masked."""

    def __init__(self, classes=10, size=32):
        super().__init__()
        spots = torch.zeros(classes, size, size)
        for c in range(classes):
            spots[c, 2 * c : 2 * c + 2, 0:2] = 5.0
        self.register_buffer("spots", spots)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the engines read the device from a parameter

    def forward(self, x):
        return torch.einsum("nhw,chw->nc", x[:, 0], self.spots) + self.anchor


def split_of(images: torch.Tensor, labels) -> Split:
    return Split(images, torch.as_tensor(labels), np.arange(len(images)), [str(c) for c in range(10)],
                 tuple(images.shape[2:]))


def test_targeted_selection_finds_a_tiny_sufficient_subset_for_every_class():
    # normalised to exactly 1 everywhere: mean 0, std 1/255 of a uint8 value of 1
    split = split_of(torch.ones(3, 3, 32, 32, dtype=torch.uint8), [0, 1, 2])
    normalizer = Normalizer(mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))
    table = targeted(SpotModel(), normalizer, split, sample=3, seed=0, pixels_per_step=8, tau=0.9, fraction=0.05,
                     progress=False)
    assert len(table) == 30 and table["class"].nunique() == 10
    assert (table["full_confidence"] < 0.11).all()  # no class reaches tau on the full image
    # yet every class reaches it on a subset of at most 5% of the pixels (52 of 1024): its spot survives
    assert (table["smallest_subset"] <= 52).all()
    assert (table["confidence_at_fraction"] > 0.9).all()
    assert table.groupby("index")["predicted"].sum().eq(1).all()


def test_swap_pairs_other_classes_and_shows_the_partners_pixels(cifar_npz):
    split = load_split(cifar_npz, "test")
    partners = swap_partners(split.labels.numpy(), seed=0)
    assert (split.labels.numpy()[partners] != split.labels.numpy()).all()
    np.testing.assert_array_equal(partners, swap_partners(split.labels.numpy(), seed=0))
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    normalizer = Normalizer()
    everything = torch.ones(len(split), 1, 32, 32, dtype=torch.bool)
    table = swap(model, normalizer, split, everything, partners)
    with torch.no_grad():
        full = model(normalizer(split.images)).argmax(1).numpy()
    # with every pixel kept, the swapped image is the partner itself, the own subset the image itself
    np.testing.assert_array_equal(table["prediction_swapped"], full[partners])
    np.testing.assert_array_equal(table["prediction_own"], full)


def test_keep_masks_of_more_images_serve_a_smaller_balanced_subset(cifar_npz, tmp_path):
    full, small = load_split(cifar_npz, "test"), load_split(cifar_npz, "test", 50)
    keep = random_keep(len(full), 1024, 52, 0)
    save_keep_masks(tmp_path / "k.npz", 32, 32, test=(full.index, keep))
    narrowed = load_keep_masks(tmp_path / "k.npz", "test", small.index)
    position = np.searchsorted(full.index, small.index)
    np.testing.assert_array_equal(narrowed.view(50, -1).numpy(), keep[position])


def test_control_reports_write_tables_and_figures(tmp_path):
    rng = np.random.default_rng(0)
    smoothed = pd.DataFrame({
        "index": np.arange(20), "subset": ["sis"] * 10 + ["bs"] * 10, "label": 0, "target": 0,
        "full_confidence": 0.99, "kept": 40, "dilated_kept": 200, "pixels": 1024,
        **{f"confidence_{n}": rng.random(20) for n in ("subset", "dilated", "random")},
        **{f"predicted_{n}": rng.random(20) > 0.5 for n in ("subset", "dilated", "random")}})
    smoothed.to_csv(tmp_path / "smoothed.csv", index=False)
    assert main(["controls", "report", "smoothed", "--entry", "m-s0", str(tmp_path / "smoothed.csv"),
                 "--table", str(tmp_path / "t"), "--figure", str(tmp_path / "f")]) == 0
    table = pd.read_csv(tmp_path / "t.csv")
    assert table.set_index("subset").loc["sis", "confidence_dilated"] == pytest.approx(
        smoothed["confidence_dilated"][:10].mean())
    assert (tmp_path / "t.md").exists() and (tmp_path / "f.png").stat().st_size > 10_000
    assert (tmp_path / "f.pdf").exists()
