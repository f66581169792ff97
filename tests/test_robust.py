"""Adversarial robustness: PGD within its budget, robust accuracy, adversarial training as a model kind."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO, job_counts, snakemake
from overinterp.data import Normalizer
from overinterp.models import build_model
from overinterp.robust import pgd, robust_predictions

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pgd_stays_in_its_pixel_budget_and_raises_the_loss():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    normalizer = Normalizer()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    x = normalizer(images)
    y = model(x).argmax(1)
    adversarial = pgd(model, x, y, normalizer, 8 / 255, 2 / 255, 10, torch.Generator().manual_seed(0))
    pixels = lambda t: t * normalizer.std + normalizer.mean  # noqa: E731 - back to [0, 1] pixel units
    assert (pixels(adversarial) - pixels(x)).abs().max() <= 8 / 255 + 1e-5
    assert pixels(adversarial).min() >= -1e-6 and pixels(adversarial).max() <= 1 + 1e-6
    with torch.no_grad():
        assert F.cross_entropy(model(adversarial), y) > F.cross_entropy(model(x), y)
    clean, attacked = robust_predictions(model, normalizer, images, y.cpu(), 8 / 255, 2 / 255, 10, seed=0)
    assert (clean == y.numpy()).all() and (attacked == y.numpy()).mean() < 1
    # no budget, no change
    same = pgd(model, x, y, normalizer, 0.0, 2 / 255, 3)
    torch.testing.assert_close(same, x)


def test_adversarial_training_is_refused_on_pixel_subsets(cifar_npz):
    from overinterp.data import load_split
    from overinterp.train import Recipe, train_model

    train = load_split(cifar_npz, "train", 20)
    with pytest.raises(ValueError, match="adversarial training is for full images"):
        train_model("tiny", train, Recipe(epochs=1, adversarial_epsilon=8 / 255), 0, Normalizer(),
                    torch.device("cpu"), keep=torch.ones(20, 1, 32, 32, dtype=torch.bool))


SMOKE_RETRAIN_SEEDS = yaml.safe_load((REPO / "config/smoke.yaml").read_text())["subsets"]["retrain_seeds"]


@pytest.mark.slow
def test_an_adversarially_trained_model_goes_through_the_same_chain(smoke_run, tmp_path):
    """The smoke run extended by `adversarial.enabled`: the new model is trained with PGD, selects pixels and
    is retrained on them like the standard models, and both get clean and PGD accuracy."""
    run = tmp_path / "run"
    shutil.copytree(smoke_run, run, symlinks=True)
    shared = "results/retrain/tiny-adv-s0/random-0.05-s0"
    done = snakemake(run, "--config", "adversarial={enabled: true, steps: 2, eval_steps: 2}", "--cores", "2",
                     "results/tables/robustness.csv", "results/tables/mitigation.csv", f"{shared}/test.json",
                     configfiles=(REPO / "config/smoke.yaml", run / "source.yaml"))
    # its random-subset model is the standard model's, copied (the same masks): only the BS ones are trained
    jobs = job_counts(done.stdout + done.stderr)
    assert jobs["share_random_retrain"] == 1 and jobs["retrain"] == len(SMOKE_RETRAIN_SEEDS), jobs
    standard = run / "results/retrain/tiny-s0/random-0.05-s0/model.pt"
    assert (run / shared / "model.pt").read_bytes() == standard.read_bytes()
    assert json.loads((run / shared / "test.json").read_text())["architecture"] == "tiny-adv"
    robustness = pd.read_csv(run / "results/tables/robustness.csv").set_index("model")
    assert robustness.loc["tiny-adv-s0", "kind"] == "adversarial" and robustness.loc["tiny-s0", "kind"] == "single"
    assert (robustness["robust_accuracy"] <= robustness["clean_accuracy"]).all()
    assert (robustness["steps"] == 2).all() and np.allclose(robustness["epsilon"], 8 / 255)
    from overinterp.utils import load_torch

    recipe = load_torch(run / "results/models/tiny-adv-s0/model.pt")["meta"]["recipe"]
    assert recipe["adversarial_epsilon"] == pytest.approx(8 / 255) and recipe["adversarial_steps"] == 2
    assert load_torch(run / "results/models/tiny-s0/model.pt")["meta"]["recipe"]["adversarial_epsilon"] == 0
    mitigation = pd.read_csv(run / "results/tables/mitigation.csv").set_index("model")
    assert mitigation.loc["tiny-adv-s0", "kind"] == "adversarial"
    assert 0 <= mitigation.loc["tiny-adv-s0", "retrained_bs_accuracy"] <= 1
    summary = json.loads((run / "results/retrain/tiny-adv-s0/gradient-bs-0.05-s0/test.json").read_text())
    assert summary["architecture"] == "tiny-adv" and summary["kind"] == "adversarial"
