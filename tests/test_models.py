import pytest
import torch

from overinterp.models import ARCHITECTURES, Ensemble, InputDropout, build_model, count_parameters


@pytest.mark.parametrize("arch, params", [("cifar_resnet20", 269_722), ("cifar_resnet18", 11_173_962),
                                          ("cifar_vgg16_bn", 14_724_042), ("tiny", 3_922)])
def test_parameter_counts(arch, params):
    model = build_model(arch)
    assert count_parameters(model) == params
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_registry_is_complete():
    assert set(ARCHITECTURES) == {"cifar_resnet20", "cifar_resnet18", "cifar_vgg16_bn", "tiny",
                                  "inception_v3", "resnet50", "efficientnet_lite0"}  # the last three: ImageNet


def test_ensemble_averages_logits():
    torch.manual_seed(0)
    members = [build_model("tiny").eval() for _ in range(3)]
    x = torch.randn(4, 3, 32, 32)
    expected = sum(m(x) for m in members) / 3
    torch.testing.assert_close(Ensemble(members)(x), expected)


def test_input_dropout_drops_whole_pixels_in_training_only():
    dropout = InputDropout(0.5, baseline=0.0)
    x = torch.ones(8, 3, 16, 16)
    out = dropout.train()(x)
    dropped = out == 0
    assert torch.equal(dropped[:, :1].expand_as(dropped), dropped)  # all channels together
    assert 0.3 < dropped.float().mean() < 0.7
    assert torch.equal(dropout.eval()(x), x)
