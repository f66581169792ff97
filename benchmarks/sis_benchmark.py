"""Speed of exact BackSelect (incremental and full-forward evaluators) and GradientBackSelect against the
model's own plain forward throughput, in one run.

    python benchmarks/sis_benchmark.py [--models cifar_resnet20 cifar_resnet18 cifar_vgg16_bn] [--image-size 32]
        [--threads 1 --clock process] [--whole-image 1] [--gradient] [--naive] [--device auto] [--data cifar10.npz]

For each model it prints, measured interleaved (A B C A B C ...) and quoted as medians so that a busy machine
disturbs the ratios little:
* the best plain forward throughput (images/s over batch sizes and both memory layouts): the old ceiling;
* exact BackSelect's candidate evaluations/s with full forwards and with the incremental evaluator, each at
  the batch size the engine measures for itself, the ratio to the best plain forward, and the seconds per
  image that follow (H*W(H*W+1)/2 evaluations);
* with ``--whole-image N``: N whole BackSelect runs per evaluator, their evaluations/s and, in float32, where
  the two evaluators' orderings first differ and how close the two pixels' values were there (near-ties);
* with ``--gradient``: GradientBackSelect against the best forward+backward throughput; with ``--naive``: a
  paper-style loop (one image at a time, numpy candidates on the host, a device copy per batch).
Untrained weights are fine for speed (the work does not depend on them); ``--data`` takes real test images.
On a shared machine, ``--clock process`` (CPU time of this process) with ``--threads 1`` is steadier.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from overinterp import incremental
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


def interleaved(runs: dict, rounds: int, seconds: float, device) -> dict[str, float]:
    """Median items/s of each ``name: (callable, items per call)``, measured in turn, ``rounds`` times."""
    rates = {name: [] for name in runs}
    for run, _ in runs.values():
        run()
    for _ in range(rounds):
        for name, (run, items) in runs.items():
            rates[name].append(timed_rate(run, items, seconds, device))
    return {name: statistics.median(values) for name, values in rates.items()}


def candidate_runs(model, image, device) -> dict:
    """Exact BackSelect's candidate evaluation with each evaluator, at the batch size the engine measures."""
    _, height, width = image.shape
    pixels = height * width
    runs = {}
    for evaluator in ("full", "incremental"):
        engine = BackSelect(model, progress=False, evaluator=evaluator)
        try:
            forward, size, _ = engine._plan(tuple(image.shape))
        except ValueError as err:
            print(f"  {err}")
            continue
        x = image.unsqueeze(0).to(device)
        candidate = torch.arange(size, device=device) % pixels
        slots = torch.zeros(size, dtype=torch.long, device=device)
        if forward is not None:
            forward.ensure_capacity(1)

        def run(engine=engine, forward=forward, x=x, candidate=candidate, slots=slots, size=size):
            with torch.inference_mode():
                if forward is None:  # what the engine does per batch: mask one pixel per copy, forward
                    batch = x.repeat(size, 1, 1, 1)
                    batch.view(size, x.shape[1], -1)[torch.arange(size, device=device), :, candidate] = 0.0
                    engine.probabilities(batch)
                else:  # and the incremental evaluator, with one cache refresh per step (a step = H*W candidates)
                    if not hasattr(run, "done") or run.done >= pixels:
                        forward.refresh(slots[:1], x)
                        run.done = 0
                    forward.logits(slots, candidate)
                    run.done += size

        runs[f"{evaluator} evaluator, batch {size}"] = (run, size)
    return runs


def whole_images(model, images, device, evaluators) -> None:
    """Whole BackSelect runs (float32): speed and, with both evaluators, where the orderings first differ."""
    pixels = images.shape[2] * images.shape[3]
    results = {}
    for evaluator in evaluators:
        engine = BackSelect(model, progress=False, evaluator=evaluator)
        start = clock()
        results[evaluator] = engine.attribute(images.to(device))
        seconds = clock() - start
        print(f"  whole images, {evaluator:11s}: {len(images) * pixels * (pixels + 1) / 2 / seconds:8.0f} evaluations/s, "
              f"{seconds / len(images):7.1f} s per image ({results[evaluator].meta['evaluator']})")
    if len(results) < 2:
        return
    full, fast = results["full"], results["incremental"]
    for b in range(len(images)):
        differ = np.flatnonzero(full.order[b] != fast.order[b])
        if not len(differ):
            print(f"  image {b}: identical orderings; max value difference {np.abs(full.values[b] - fast.values[b]).max():.1e}")
            continue
        step = differ[0]
        current = images[b].double().clone().view(images.shape[1], -1)
        current[:, full.order[b, :step]] = 0.0
        pair = current.repeat(2, 1, 1)
        pair[0, :, full.order[b, step]] = pair[1, :, fast.order[b, step]] = 0.0
        reference = model.double() if device.type == "cpu" else model
        with torch.inference_mode():
            f = reference(pair.view(2, *images.shape[1:]).to(device, next(reference.parameters()).dtype)).softmax(1)
        model.float()
        gap = abs(float(f[0, full.target[b]] - f[1, full.target[b]]))
        print(f"  image {b}: orderings first differ at step {step} of {pixels} (pixel {full.order[b, step]} vs "
              f"{fast.order[b, step]}; their f differ by {gap:.1e} in float64: a near-tie)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet18", "cifar_vgg16_bn"],
                        help=f"architectures ({', '.join(ARCHITECTURES)}) or model files")
    parser.add_argument("--image-size", type=int, default=32, help="square crop side (CIFAR: 32)")
    parser.add_argument("--whole-image", type=int, default=0, metavar="N",
                        help="also run N whole BackSelects per evaluator (minutes per 32x32 image on a CPU)")
    parser.add_argument("--evaluators", nargs="+", default=["full", "incremental"], choices=["full", "incremental"],
                        help="evaluators of the whole-image runs (both: their float32 orderings are compared)")
    parser.add_argument("--gradient", action="store_true", help="also measure GradientBackSelect")
    parser.add_argument("--gradient-images", type=int, default=64)
    parser.add_argument("--pixels-per-step", type=int, default=10)
    parser.add_argument("--naive", action="store_true", help="also measure a paper-style loop")
    parser.add_argument("--naive-seconds", type=float, default=15.0)
    parser.add_argument("--naive-batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast on CUDA for the plain forwards")
    parser.add_argument("--data", default=None, help="converted CIFAR-10 file: use its test images (centre crop)")
    parser.add_argument("--seconds", type=float, default=1.5, help="time per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurements of each figure")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: PyTorch's choice)")
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                        help="wall time, or CPU time of this process (steadier on a busy machine)")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    size, pixels = args.image_size, args.image_size ** 2
    print(f"{size}x{size} images, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if cuda else f' ({torch.get_num_threads()} threads)'}, "
          f"{args.clock} clock, medians of {args.rounds} interleaved measurements")
    image = load_images(args, 1)[0].to(device)
    for name in args.models:
        torch.manual_seed(0)
        model = load_model(name, device) if name.endswith(".pt") else \
            build_model(name).to(device, memory_format=torch.channels_last).eval()
        print(f"\n{name}")
        batch_sizes = [1024, 2048, 4096, 8192, 16384] if cuda else [32, 64, 128, 256, 512]
        forwards = {}
        for layout, memory_format in LAYOUTS.items():
            for bs in batch_sizes:
                x = image.expand(bs, -1, -1, -1).contiguous(memory_format=memory_format)

                def forward(x=x, memory_format=memory_format):
                    with torch.inference_mode(), autocast(device, args.bf16):
                        model.to(memory_format=memory_format)(x).float().softmax(1)

                forwards[f"plain forward, {layout}, batch {bs}"] = (forward, bs)
        rates = interleaved({**forwards, **candidate_runs(model, image, device)}, args.rounds, args.seconds, device)
        model.to(memory_format=torch.channels_last)
        best = max((k for k in rates if k.startswith("plain")), key=rates.get)
        for label, rate in rates.items():
            if label.startswith("plain") and label != best:
                continue
            line = f"  {label:42s} {rate:8.0f} /s  x{rate / rates[best]:.2f}"
            if not label.startswith("plain"):
                line += f"  ({pixels * (pixels + 1) / 2 / rate:6.0f} s per image)"
            print(line + ("  (best plain forward)" if label == best else ""))
        if args.whole_image:
            whole_images(model, load_images(args, args.whole_image), device, args.evaluators)
        if args.naive:
            naive = naive_rate(model, image.float().cpu().numpy(), device, args.naive_batch_size, args.naive_seconds)
            print(f"  naive paper-style BackSelect (batch {args.naive_batch_size}): {naive:8.0f} evaluations/s")
        if args.gradient:
            gradient(model, args, device)


def gradient(model, args, device) -> None:
    cuda = device.type == "cuda"
    size, pixels = args.image_size, args.image_size ** 2
    grad_sizes = [256, 512, 1024, 2048] if cuda else [8, 16, 32, 64]
    grad_rates = forward_backward_rates(model, size, grad_sizes, device, args.bf16, args.seconds)
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
    print(f"  GradientBackSelect (k={k}, batch {engine.batch_size}): {grad_rate:8.0f} image forward+backward/s "
          f"({grad_seconds / args.gradient_images:.3f} s per image, {steps} steps); best forward+backward "
          f"(batch {best_grad_bs}) {grad_rates[best_grad_bs]:8.0f}/s, ratio {grad_rate / grad_rates[best_grad_bs]:.3f}")


if __name__ == "__main__":
    main()
