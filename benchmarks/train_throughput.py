"""Training throughput (images/s) of a CIFAR model with the project's training step, on every device here.

    python benchmarks/train_throughput.py [--arch cifar_resnet20] [--batch-size 128] [--steps 30]

Prints images/s for channels_last (what training uses) and for the default contiguous layout as the
baseline measured in the same run, on the CPU and, when present, on CUDA (bf16 autocast).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from overinterp.models import build_model
from overinterp.train import augment


def throughput(arch: str, device: torch.device, batch_size: int, steps: int, channels_last: bool) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(arch).to(device, memory_format=layout).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        batch = augment(x, 4, True, 0.0, generator).contiguous(memory_format=layout)
        with autocast:
            loss = F.cross_entropy(model(batch), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="cifar_resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    print(f"{args.arch}, batch {args.batch_size}, {args.steps} steps, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    for device in devices:
        fast = throughput(args.arch, device, args.batch_size, args.steps, channels_last=True)
        base = throughput(args.arch, device, args.batch_size, args.steps, channels_last=False)
        name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
        print(f"{name:>24}: {fast:8.0f} images/s channels_last | {base:8.0f} images/s contiguous | "
              f"ratio {fast / base:.2f}")


if __name__ == "__main__":
    main()
