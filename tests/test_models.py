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


def test_a_pretrained_classifier_becomes_a_model_file_for_the_workflow(cifar_imagefolder, tmp_path):
    """`overinterp model`: torchvision's Inception v3 with a state dict of the user's (auxiliary head included)
    is stored without the auxiliary head, for the dataset's classes and frame, and reloads to the same outputs."""
    import torchvision

    from overinterp.cli import main
    from overinterp.datasets import ImageFolder, write_dataset_file
    from overinterp.models import load_model

    data = tmp_path / "data.npz"
    write_dataset_file(ImageFolder(cifar_imagefolder, (80, 80), workers=2), data, stream=True)
    torch.manual_seed(0)
    network = torchvision.models.inception_v3(num_classes=10, aux_logits=True, init_weights=False).eval()
    torch.save(network.state_dict(), tmp_path / "inception.pth")
    out = tmp_path / "model.pt"
    assert main(["model", "--model", "torchvision:inception_v3", "--weights", str(tmp_path / "inception.pth"),
                 "--data", str(data), "--out", str(out)]) == 0
    blob = torch.load(out, weights_only=True)
    assert blob["arch"] == "torchvision:inception_v3" and not any(k.startswith("AuxLogits.") for k in blob["state_dict"])
    assert blob["meta"]["crop"] == 80 and len(blob["meta"]["classes"]) == 10
    x = torch.randn(2, 3, 80, 80)
    network.transform_input = True  # as torchvision builds it for ImageNet weights, and as it is stored
    torch.testing.assert_close(load_model(out)(x), network(x), rtol=1e-4, atol=1e-4)
    # Retraining builds the same network fresh, without the auxiliary head: one output in training mode.
    assert build_model("torchvision:inception_v3", num_classes=10).train()(x).shape == (2, 10)


def test_the_error_messages_of_the_model_command(cifar_imagefolder, tmp_path, capsys):
    """Weights of another class count, and what the stages cannot rebuild by name, are one-line errors."""
    from overinterp.cli import main
    from overinterp.datasets import ImageFolder, write_dataset_file

    data = tmp_path / "data.npz"
    write_dataset_file(ImageFolder(cifar_imagefolder, (32, 32), workers=2), data, stream=True)
    torch.save(build_model("tiny", num_classes=3).state_dict(), tmp_path / "three.pth")
    assert main(["model", "--model", "tiny", "--weights", str(tmp_path / "three.pth"), "--data", str(data),
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "does not fit the architecture" in capsys.readouterr().err
    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(build_model("tiny").eval(), torch.randn(1, 3, 32, 32)), scripted)
    assert main(["model", "--model", str(scripted), "--data", str(data), "--out", str(tmp_path / "m.pt")]) == 2
    assert "cannot be stored as a model file of this pipeline" in capsys.readouterr().err
