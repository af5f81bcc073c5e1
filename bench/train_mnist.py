"""Benchmark `selfhost train mnist` against the pytorch/examples mnist recipe, in the same run.

1. selfhost's default recipe on the full data: time to 99% test accuracy (checked after every epoch,
   wall time from the start, data loading included), final accuracy, training images/s.
2. The reference recipe of pytorch/examples/mnist (Conv32-Conv64-FC128 with dropout, Adadelta lr 1.0,
   StepLR gamma 0.7, batch 64) for the same wall time, with the same in-memory batching (no DataLoader),
   tested after every epoch and when the time is up.

    .venv/bin/python bench/train_mnist.py                  # CPU: all cores torch may use (2 here)
    taskset -c 0,1 .venv/bin/python bench/train_mnist.py   # 2 cores of a bigger machine
    .venv/bin/python bench/train_mnist.py --device cuda    # on a GPU machine
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    name: str
    parameters: int = 0
    epochs: float = 0.0
    images: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    time_to_99: float | None = None
    accuracy: float = 0.0
    curve: list[tuple[float, float]] = field(default_factory=list)  # (wall s, test accuracy)

    def record(self, wall: float, accuracy: float) -> None:
        self.curve.append((wall, accuracy))
        self.accuracy = accuracy
        if self.time_to_99 is None and accuracy >= 0.99:
            self.time_to_99 = wall


def run_selfhost(data: Path, device: str, seed: int, limit: int | None = None) -> Run:
    from selfhost.events import Notice, Progress
    from selfhost.train import runs
    from selfhost.train.mnist.train import TrainConfig, train

    run = Run("selfhost default")
    config = TrainConfig(data=data, device=device, seed=seed, train_limit=limit, test_limit=limit)
    per_epoch = 0
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        config.out = Path(out)
        for event in train(config):
            if isinstance(event, Notice) and event.message.startswith("training on"):
                info = runs.read_info(config.out)  # what the run recorded about itself
                run.parameters = info["params"]
                per_epoch = info["steps_per_epoch"] * config.batch_size
                print(f"  selfhost: {event.message}", flush=True)
            elif isinstance(event, Progress) and event.task == "test":  # an epoch ended
                m = event.metrics
                run.epochs += 1
                run.images += per_epoch
                run.train_seconds += per_epoch / m["images_per_s"]
                run.record(time.perf_counter() - start, m["test_accuracy"])
                print(
                    f"  selfhost epoch {event.done:.0f}: test {100 * m['test_accuracy']:.2f}% "
                    f"at {run.curve[-1][0]:.1f} s ({m['images_per_s']:,.0f} images/s)",
                    flush=True,
                )
    run.wall_seconds = time.perf_counter() - start
    return run


def reference_net():
    """pytorch/examples mnist `Net`, verbatim architecture."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 3, 1)
            self.conv2 = nn.Conv2d(32, 64, 3, 1)
            self.dropout1 = nn.Dropout(0.25)
            self.dropout2 = nn.Dropout(0.5)
            self.fc1 = nn.Linear(9216, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.conv1(x))
            x = F.relu(self.conv2(x))
            x = F.max_pool2d(x, 2)
            x = self.dropout1(x)
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = self.dropout2(x)
            return F.log_softmax(self.fc2(x), dim=1)

    return Net()


def run_reference(data: Path, device_name: str, seed: int, budget: float, limit: int | None = None) -> Run:
    import torch
    import torch.nn.functional as F

    from selfhost.train.common import cpu_cores as cpu_count
    from selfhost.train.common import pick_device
    from selfhost.train.mnist.net import normalise
    from selfhost.train.mnist.train import load_tensors

    start = time.perf_counter()
    device = pick_device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(cpu_count())
    torch.manual_seed(seed)
    tensors = load_tensors(data, device, limit, limit)
    model = reference_net().to(device)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    run = Run("pytorch/examples", parameters=sum(p.numel() for p in model.parameters()))
    n, batch = len(tensors.train_x), 64

    def test_accuracy() -> float:
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(tensors.test_x), 1000):
                logits = model(normalise(tensors.test_x[i : i + 1000]))
                correct += int((logits.argmax(1) == tensors.test_y[i : i + 1000]).sum())
        return correct / len(tensors.test_x)

    epoch = 0
    out_of_time = False
    while not out_of_time:
        epoch += 1
        model.train()
        order = torch.randperm(n, device=device)
        t0 = time.perf_counter()
        steps = 0
        for i in range(0, n, batch):
            index = order[i : i + batch]
            loss = F.nll_loss(model(normalise(tensors.train_x[index])), tensors.train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += len(index)
            if time.perf_counter() - start >= budget:
                out_of_time = True
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        run.train_seconds += time.perf_counter() - t0
        run.images += steps
        run.epochs += steps / n
        schedule.step()
        run.record(time.perf_counter() - start, test_accuracy())
        print(
            f"  reference epoch {run.epochs:.2f}: test {100 * run.accuracy:.2f}% at {run.curve[-1][0]:.1f} s "
            f"({steps / (time.perf_counter() - t0):,.0f} images/s)",
            flush=True,
        )
    run.wall_seconds = time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, mps or auto")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N images only (a quick smoke run)")
    args = parser.parse_args()

    from selfhost.train.common import cpu_cores as cpu_count

    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cores {cpu_count()}",
        flush=True,
    )
    ours = run_selfhost(args.data, args.device, args.seed, args.limit)
    print(f"load average after selfhost: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    ref = run_reference(args.data, args.device, args.seed, ours.wall_seconds, args.limit)
    print(f"load average after reference: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    def fmt_time(t: float | None) -> str:
        return f"{t:.1f} s" if t is not None else "not reached"

    print()
    print(
        f"| recipe ({args.device}) | parameters | epochs | train images/s | time to 99% | final test acc. |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for run in (ours, ref):
        speed = run.images / run.train_seconds if run.train_seconds else 0
        print(
            f"| {run.name} | {run.parameters:,} | {run.epochs:.2f} | {speed:,.0f} "
            f"| {fmt_time(run.time_to_99)} | {100 * run.accuracy:.2f}% |"
        )
    print()
    print(f"same wall time for both: {ours.wall_seconds:.1f} s")
    print(
        f"accuracy at that time: selfhost {100 * ours.accuracy:.2f}% vs reference {100 * ref.accuracy:.2f}% "
        f"(error rate ratio {(1 - ref.accuracy) / max(1 - ours.accuracy, 1e-9):.2f}x)"
    )
    if ours.time_to_99 and ref.time_to_99:
        print(f"time to 99%: {ref.time_to_99 / ours.time_to_99:.2f}x faster than the reference")
    elif ours.time_to_99:
        print(
            f"time to 99%: the reference did not reach 99% in {ours.wall_seconds:.1f} s "
            f"(> {ours.wall_seconds / ours.time_to_99:.2f}x)"
        )
    ours_speed = ours.images / ours.train_seconds
    ref_speed = ref.images / ref.train_seconds
    print(f"training throughput: {ours_speed / ref_speed:.2f}x the reference's images/s")


if __name__ == "__main__":
    main()
