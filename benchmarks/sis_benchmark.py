"""Speed of BackSelect and GradientBackSelect against the model's own throughput, in one run.

    python benchmarks/sis_benchmark.py [--model cifar_resnet20|PATH.pt] [--images 4] [--image-size 16]
                                       [--gradient-images 64] [--device auto] [--bf16] [--data cifar10.npz]

On the same model and images it prints:
* masked evaluations/s of exact BackSelect, the best plain forward throughput of the model (over batch
  sizes and memory layouts), their ratio, and the speedup over a naive implementation in the style of the
  paper's code (one image at a time; each step builds the masked copies with numpy on the host and moves
  every batch to the device, and the probabilities back);
* GradientBackSelect in image forward+backward passes/s against the best forward+backward throughput of
  the same computation (gradient of f with respect to a pixel mask);
* seconds per image of both at this image size (an exact run costs H*W(H*W+1)/2 forwards per image, so
  use --image-size 32 --images 1 for CIFAR-sized timings; that takes minutes on a CPU).
Untrained weights are fine: the work does not depend on them. On a shared machine, ``--clock process``
(CPU time of this process) with ``--threads 1`` gives ratios that other jobs disturb far less than wall
time does.
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from overinterp.models import ARCHITECTURES, build_model, load_model
from overinterp.sis import BackSelect, GradientBackSelect
from overinterp.utils import resolve_device

LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
clock = time.perf_counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(run, items_per_call: int, seconds: float, device) -> float:
    """Items/s of ``run()`` repeated for about ``seconds`` after one warm-up call."""
    run()
    sync(device)
    calls, start = 0, clock()
    while True:
        run()
        calls += 1
        sync(device)
        elapsed = clock() - start
        if elapsed >= seconds:
            return calls * items_per_call / elapsed


def autocast(device, bf16):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def forward_rates(model, size, batch_sizes, device, bf16, seconds):
    rates = {}
    for name, layout in LAYOUTS.items():
        model.to(memory_format=layout)
        for bs in batch_sizes:
            x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=layout)

            def run():
                with torch.inference_mode(), autocast(device, bf16):
                    model(x).float().softmax(1)

            rates[name, bs] = timed_rate(run, bs, seconds, device)
    model.to(memory_format=torch.channels_last)
    return rates


def forward_backward_rates(model, size, batch_sizes, device, bf16, seconds):
    """The gradient method's inner step: f of the masked input and its gradient w.r.t. the mask."""
    rates = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        mask = torch.zeros(bs, 1, size, size, device=device)
        target = torch.zeros(bs, dtype=torch.long, device=device)

        def run():
            m = mask.clone().requires_grad_()
            with autocast(device, bf16):
                logits = model((x * (1 - m)).contiguous(memory_format=torch.channels_last))
            f = logits.float().softmax(1).gather(1, target.unsqueeze(1))
            torch.autograd.grad(f.sum(), m)

        rates[bs] = timed_rate(run, bs, seconds, device)
    return rates


def naive_rate(model, image: np.ndarray, device, batch_size: int, seconds: float) -> float:
    """Masked evaluations/s of a paper-style BackSelect: host numpy candidates, a device copy per batch."""

    def probabilities(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch).to(device)).softmax(1).cpu().numpy()

    _, h, w = image.shape
    target = int(np.argmax(probabilities(image[None])[0]))
    current, remaining = image.copy(), list(range(h * w))
    evaluations, start = 0, clock()
    while remaining and clock() - start < seconds:
        candidates = np.repeat(current[None], len(remaining), axis=0)
        for i, p in enumerate(remaining):
            candidates[i, :, p // w, p % w] = 0.0
        values = np.concatenate([probabilities(candidates[i : i + batch_size])[:, target]
                                 for i in range(0, len(candidates), batch_size)])
        p = remaining.pop(int(np.argmax(values)))
        current[:, p // w, p % w] = 0.0
        evaluations += len(values)
    sync(device)
    return evaluations / (clock() - start)


def load_images(args, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if not args.data:
        return torch.randn(count, 3, args.image_size, args.image_size, generator=generator)
    from overinterp.data import Normalizer, load_split

    images = Normalizer()(load_split(args.data, "test").images[:count])
    offset = (images.shape[-1] - args.image_size) // 2
    return images[..., offset : offset + args.image_size, offset : offset + args.image_size].contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet20", help=f"architecture ({', '.join(ARCHITECTURES)}) or model file")
    parser.add_argument("--images", type=int, default=4, help="images for exact BackSelect")
    parser.add_argument("--gradient-images", type=int, default=64, help="images for GradientBackSelect")
    parser.add_argument("--image-size", type=int, default=16, help="square crop side (CIFAR: 32)")
    parser.add_argument("--pixels-per-step", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA, everywhere")
    parser.add_argument("--data", default=None, help="converted CIFAR-10 file: use its test images (centre crop)")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per throughput measurement")
    parser.add_argument("--naive-seconds", type=float, default=15.0)
    parser.add_argument("--naive-batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall time, or CPU time of this process (steadier on a busy machine)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.model.endswith(".pt"):
        model = load_model(args.model, device)
    else:
        model = build_model(args.model).to(device, memory_format=torch.channels_last).eval()
    size, pixels = args.image_size, args.image_size ** 2
    cuda = device.type == "cuda"
    print(f"model {args.model}, {size}x{size} images, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else f' ({torch.get_num_threads()} threads)'}"
          f"{', bf16 autocast' if args.bf16 else ''}, {args.clock} clock")

    batch_sizes = [1024, 2048, 4096, 8192, 16384] if cuda else [32, 64, 128, 256, 512]
    rates = forward_rates(model, size, batch_sizes, device, args.bf16, args.seconds)
    for (layout, bs), rate in rates.items():
        print(f"  forward {layout:13s} batch {bs:6d}: {rate:10.0f} images/s")
    best_layout, best_bs = max(rates, key=rates.get)

    images = load_images(args, args.images).to(device)
    engine = BackSelect(model, batch_size=best_bs, bf16=args.bf16, progress=False,
                        memory_format=LAYOUTS[best_layout])
    start = clock()
    engine.attribute(images)
    sync(device)
    exact_seconds = clock() - start
    exact_rate = args.images * pixels * (pixels + 1) / 2 / exact_seconds
    # Forward throughput again after the long run, so a busy machine does not favour either side.
    best_forward = max(max(rates.values()), forward_rates(model, size, [best_bs], device, args.bf16, args.seconds)
                       [best_layout, best_bs])
    naive = naive_rate(model, images[0].float().cpu().numpy(), device, args.naive_batch_size, args.naive_seconds)

    print(f"\nBackSelect (exact), {best_layout}, batch {best_bs}: {exact_rate:10.0f} masked evaluations/s "
          f"({exact_seconds / args.images:.2f} s per {size}x{size} image)")
    print(f"best plain forward ({best_layout}, batch {best_bs}): {best_forward:10.0f} images/s")
    print(f"ratio BackSelect / forward: {exact_rate / best_forward:.3f}")
    print(f"naive paper-style BackSelect (batch {args.naive_batch_size}): {naive:10.0f} evaluations/s; "
          f"speedup {exact_rate / naive:.1f}x")

    grad_sizes = [256, 512, 1024, 2048] if cuda else [8, 16, 32, 64]
    grad_rates = forward_backward_rates(model, size, grad_sizes, device, args.bf16, args.seconds)
    for bs, rate in grad_rates.items():
        print(f"  forward+backward batch {bs:6d}: {rate:10.0f} images/s")
    best_grad_bs = max(grad_rates, key=grad_rates.get)
    images = load_images(args, args.gradient_images).to(device)
    k = args.pixels_per_step
    engine = GradientBackSelect(model, pixels_per_step=k, batch_size=min(best_grad_bs, args.gradient_images),
                                bf16=args.bf16, progress=False)
    start = clock()
    engine.attribute(images)
    sync(device)
    grad_seconds = clock() - start
    steps = math.ceil(pixels / k)
    grad_rate = args.gradient_images * steps / grad_seconds
    print(f"\nGradientBackSelect (k={k}, batch {engine.batch_size}): {grad_rate:10.0f} image forward+backward/s "
          f"({grad_seconds / args.gradient_images:.3f} s per {size}x{size} image, {steps} steps)")
    print(f"best forward+backward (batch {best_grad_bs}): {grad_rates[best_grad_bs]:10.0f} images/s; "
          f"ratio {grad_rate / grad_rates[best_grad_bs]:.3f}")


if __name__ == "__main__":
    main()
