"""Training: augmentation keeps image and mask aligned, a killed run resumes to identical weights."""
import signal
import subprocess
import sys
import time

import pandas as pd
import torch

from overinterp.data import Normalizer
from overinterp.models import load_model
from overinterp.data import model_inputs
from overinterp.train import augment


def test_augment_moves_image_and_mask_together():
    """Masking before augmenting: the baseline-valued pixels after the crop/flip are exactly the
    augmented mask's holes (the reference code's misalignment cannot happen)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 255, (16, 3, 32, 32), dtype=torch.uint8)
    keep = torch.rand(16, 1, 32, 32, generator=g) < 0.05
    normalizer = Normalizer(baseline=-7.0)  # a value no real pixel takes
    x = model_inputs(normalizer, images, keep, positions_only=False)
    stacked = torch.cat([x, keep.float()], 1)
    out = augment(stacked, 4, True, 0.0, torch.Generator().manual_seed(1))
    aug_x, aug_keep = out[:, :3], out[:, 3:]
    inside = aug_x != 0.0  # the padding value used above
    assert torch.equal((aug_x[:, :1] == -7.0) & inside[:, :1], (aug_keep == 0) & inside[:, :1])
    assert not torch.equal(out, stacked)  # something moved


def test_augment_is_a_crop_of_the_padded_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = augment(x, 1, False, -1.0, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)
    for i in range(2):
        windows = [padded[i, :, dy:dy + 4, dx:dx + 4] for dy in range(3) for dx in range(3)]
        assert any(torch.equal(out[i], w) for w in windows)


def train_command(cifar_npz, out_dir, epochs=4):
    return [sys.executable, "-m", "overinterp", "train", "--data", str(cifar_npz), "--arch", "tiny",
            "--seed", "3", "--recipe", f'{{"epochs": {epochs}, "batch_size": 50, "milestones": [2]}}',
            "--device", "cpu", "--checkpoint", str(out_dir / "ckpt.pt"),
            "--out", str(out_dir / "model.pt"), "--metrics", str(out_dir / "metrics.csv")]


def test_killed_training_resumes_to_identical_weights(cifar_npz, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(train_command(cifar_npz, straight), check=True, capture_output=True)

    proc = subprocess.Popen(train_command(cifar_npz, killed), stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "ckpt.pt").exists():
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    epoch_at_kill = torch.load(killed / "ckpt.pt", weights_only=True)["epoch"]
    assert epoch_at_kill < 4 and not (killed / "model.pt").exists()
    resumed = subprocess.run(train_command(cifar_npz, killed), check=True, capture_output=True, text=True)
    assert f"after epoch {epoch_at_kill}" in resumed.stderr

    a, b = load_model(straight / "model.pt"), load_model(killed / "model.pt")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not (killed / "ckpt.pt").exists()
    metrics = pd.read_csv(killed / "metrics.csv")
    assert list(metrics["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(metrics.drop(columns=["seconds", "images_per_second"]),
                                  pd.read_csv(straight / "metrics.csv").drop(columns=["seconds", "images_per_second"]))


def test_training_learns(cifar_npz, tmp_path):
    subprocess.run(train_command(cifar_npz, tmp_path, epochs=6), check=True, capture_output=True)
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    assert metrics["train_accuracy"].iloc[-1] > 0.15  # above chance (0.10) on 10 classes


def test_a_streamed_dataset_trains_and_predicts_as_the_same_images_in_memory(cifar_imagefolder, tmp_path):
    """`convert --stream` lists the files; every stage reads them when it needs them. The same images in
    memory and streamed give the same batches, augmentation, weights, metrics and predictions, masked too."""
    import numpy as np

    from overinterp.data import FolderImages, load_split
    from overinterp.datasets import ImageFolder, write_dataset_file
    from overinterp.evaluate import predict_split
    from overinterp.subsets import load_packed_keep_masks, random_keep, save_keep_masks
    from overinterp.train import Recipe, train_model

    folder = ImageFolder(cifar_imagefolder, (28, 24), workers=2)
    files = {}
    for stream in (False, True):
        files[stream] = tmp_path / f"stream-{stream}.npz"
        write_dataset_file(folder, files[stream], stream=stream)
    listed = np.load(files[True])
    assert "train_images" not in listed and listed["train_files"][0].startswith("train/")
    assert listed["frame"].tolist() == [28, 24] and files[True].stat().st_size < files[False].stat().st_size / 10
    splits = {stream: (load_split(path, "train", 60), load_split(path, "test", 20)) for stream, path in files.items()}
    train, test = splits[True]
    assert isinstance(train.images, FolderImages) and train.images.shape == (60, 3, 24, 24)
    assert torch.equal(train.images[np.arange(60)], splits[False][0].images)
    masks = tmp_path / "keep.npz"
    save_keep_masks(masks, 24, 24, train=(train.index, random_keep(60, 576, 100, 1)),
                    test=(test.index, random_keep(20, 576, 100, 2)))
    keep = {s.index.size: load_packed_keep_masks(masks, name, s.index) for name, s in (("train", train), ("test", test))}
    recipe, normalizer = Recipe(epochs=2, batch_size=16, milestones=[1]), Normalizer()
    runs = {stream: train_model("tiny", tr, recipe, 0, normalizer, torch.device("cpu"), keep=keep[60], test=te,
                                test_keep=keep[20], progress=False) for stream, (tr, te) in splits.items()}
    (memory, memory_metrics), (streamed, streamed_metrics) = runs[False], runs[True]
    for (name, a), b in zip(memory.state_dict().items(), streamed.state_dict().values()):
        assert torch.equal(a, b), name
    pd.testing.assert_frame_equal(memory_metrics.drop(columns=["seconds", "images_per_second"]),
                                  streamed_metrics.drop(columns=["seconds", "images_per_second"]))
    probs = predict_split(streamed, normalizer, test.images, keep[20], chunk=7)
    assert torch.equal(probs, predict_split(memory, normalizer, splits[False][1].images, keep[20][:]))


def test_random_resized_crop_moves_image_and_mask_together():
    """The recipe's random-resized crop on the device: boxes of min_scale..100% of the area, the image and
    its mask (as a channel) cropped alike; the same seed gives the same crops."""
    from overinterp.train import random_resized_crop

    rows = torch.arange(32, dtype=torch.float32).view(1, 1, 32, 1).expand(8, 1, 32, 32)
    cols = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 32).expand(8, 1, 32, 32)
    out = random_resized_crop(torch.cat([rows, cols], 1), 0.25, torch.Generator().manual_seed(0))
    assert out.shape == (8, 2, 32, 32)
    # Each output is a linear ramp over its box: the spans say how large the boxes were.
    height = out[:, 0, -1, 0] - out[:, 0, 0, 0]
    width = out[:, 1, 0, -1] - out[:, 1, 0, 0]
    area = (height + height / 31) * (width + width / 31) / 32 ** 2
    assert (area > 0.25 - 0.02).all() and (area <= 1.0 + 1e-4).all() and area.std() > 0.02, area
    assert (out >= -0.5).all() and (out <= 31.5).all()  # inside the image
    again = random_resized_crop(torch.cat([rows, cols], 1), 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
