"""Ensembles as model files, and input-dropout evaluation (deterministic, or a seeded Monte-Carlo mean)."""
import pytest
import torch

from overinterp.evaluate import predict, predict_monte_carlo
from overinterp.models import build_model, load_model, save_ensemble, save_model


def test_ensemble_file_loads_as_mean_of_member_logits(tmp_path):
    paths, members = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        model = build_model("tiny").eval()
        save_model(tmp_path / f"m{seed}.pt", model, "tiny", seed=seed)
        paths.append(tmp_path / f"m{seed}.pt")
        members.append(model)
    save_ensemble(tmp_path / "ensemble.pt", paths)
    ensemble = load_model(tmp_path / "ensemble.pt")
    x = torch.randn(5, 3, 32, 32)
    expected = torch.stack([m(x) for m in members]).mean(0)
    torch.testing.assert_close(ensemble(x.contiguous(memory_format=torch.channels_last)), expected)


def test_input_dropout_evaluation_is_deterministic_unless_monte_carlo(tmp_path):
    torch.manual_seed(0)
    save_model(tmp_path / "d.pt", build_model("tiny", input_dropout=0.2), "tiny", input_dropout=0.2)
    model = load_model(tmp_path / "d.pt")
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(predict(model, x), predict(model, x))
    a = predict_monte_carlo(model, x, samples=4, seed=1)
    assert torch.equal(a, predict_monte_carlo(model, x, samples=4, seed=1))
    assert not torch.allclose(a, predict_monte_carlo(model, x, samples=4, seed=2))
    assert not torch.allclose(a, predict(model, x))
    assert not model.training and all(not m.training for m in model.modules())
    torch.testing.assert_close(a.sum(1), torch.ones(8))


def test_monte_carlo_needs_input_dropout():
    with pytest.raises(ValueError, match="input dropout"):
        predict_monte_carlo(build_model("tiny").eval(), torch.randn(2, 3, 32, 32), samples=2, seed=0)
