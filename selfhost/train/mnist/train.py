"""Train and test loops (pytorch/examples mnist shape: Net, train, test, main) yielding typed events.

The whole dataset lives in memory as one uint8 tensor on the training device; batches are made by
indexing it with a seeded permutation (no DataLoader, no workers). Every epoch ends with a test pass
and an atomic checkpoint (`model.safetensors` + `train_state.pt`), so Ctrl-C loses at most one epoch
and `resume=True` continues from the last one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfhost import paths
from selfhost.atomic import atomic_path
from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.train.mnist import deps
from selfhost.train.mnist.download import DownloadEvent, download_mnist
from selfhost.train.mnist.net import ARCH, DEFAULT_CHANNELS, MEAN, STD, Net, normalise

torch = deps.torch()
F = torch.nn.functional

FORMAT = "selfhost-mnist"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"


def default_out() -> Path:
    return paths.runs_dir() / "mnist"


def default_model() -> Path:
    return default_out() / MODEL_FILE


@dataclass
class TrainConfig:
    epochs: int | None = None  # None: DEFAULT_EPOCHS, or what the resumed run planned
    batch_size: int = 128
    lr: float = 0.01  # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4
    device: str = "auto"
    seed: int = 0
    augment: bool = True
    out: Path | None = None  # default: SELFHOST_HOME/runs/mnist
    data: Path | None = None  # the four IDX files; default: download into SELFHOST_HOME/data/mnist
    resume: bool = False
    train_limit: int | None = None  # train on the first N training images only
    test_limit: int | None = None  # evaluate on the first N test images only
    channels: tuple[int, int, int] = DEFAULT_CHANNELS
    threads: int | None = None  # CPU threads; None: one per core this process may use


DEFAULT_EPOCHS = 5


# ---- events -----------------------------------------------------------------------------------


@dataclass
class Started:
    device: str
    threads: int
    n_train: int
    n_test: int
    start_epoch: int  # 0 for a new run
    epochs: int
    steps_per_epoch: int
    parameters: int
    out: Path
    batch_size: int = 0  # images per step


@dataclass
class Step:
    epoch: int  # 1-based
    step: int  # 1-based, within the epoch
    steps: int
    loss: float  # mean over the epoch so far
    lr: float | None = None  # learning rate of the step just taken


@dataclass
class EpochEnd:
    epoch: int
    epochs: int
    train_loss: float
    train_accuracy: float
    test_loss: float
    test_accuracy: float
    images_per_s: float  # training throughput (the test pass excluded)
    elapsed_s: float  # since the start of this invocation
    eta_s: float


@dataclass
class Finished:
    test_accuracy: float
    confusion: list[list[int]]  # confusion[true][predicted]
    model_path: Path
    epochs: int
    elapsed_s: float


Event = DownloadEvent | Started | Step | EpochEnd | Finished


# ---- device, data -----------------------------------------------------------------------------


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda > mps > cpu; an explicit device must exist."""
    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to PyTorch", hint="use --device auto")
    if device.type == "mps" and not has_mps:
        raise UsageError("--device mps: Metal is not available to PyTorch", hint="use --device auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}", hint="use auto, cpu, cuda or mps")
    return device


@dataclass
class Tensors:
    train_x: torch.Tensor  # (N, 28, 28) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_tensors(
    data_dir: Path, device: torch.device, train_limit: int | None = None, test_limit: int | None = None
) -> Tensors:
    from selfhost.train.mnist.idx import load_mnist

    arrays = load_mnist(data_dir)

    def tensor(array, limit: int | None, long: bool = False) -> torch.Tensor:
        t = torch.from_numpy(array[:limit].copy())
        return (t.long() if long else t).to(device)

    return Tensors(
        tensor(arrays.train_images, train_limit),
        tensor(arrays.train_labels, train_limit, long=True),
        tensor(arrays.test_images, test_limit),
        tensor(arrays.test_labels, test_limit, long=True),
    )


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine per image (rotate +-10 deg, scale 0.9-1.1, shift +-2 px); x: (B, 1, 28, 28)
    in [0, 1] with 0 as background, so the zeros grid_sample pads with are background too."""
    b = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=generator.device) * (high - low) + low

    angle = uniform(-10, 10) * math.pi / 180
    scale = uniform(0.9, 1.1)
    shift = torch.stack([uniform(-2, 2), uniform(-2, 2)], dim=1) / 14  # pixels -> [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (B, 2, 2)
    theta = torch.cat([theta, shift.unsqueeze(2)], dim=2).to(x.device)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---- test pass, checkpoints -------------------------------------------------------------------


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    confusion: list[list[int]] = field(default_factory=list)
    predicted: torch.Tensor | None = None  # (N,) predicted digits, on the CPU


@torch.no_grad()
def evaluate(model: Net, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> EvalResult:
    """Loss, accuracy and confusion matrix of `model` on uint8 images (N, 28, 28)."""
    model.eval()
    total_loss, predictions = 0.0, []
    for i in range(0, len(images), batch_size):
        logits = model(normalise(images[i : i + batch_size]))
        total_loss += F.cross_entropy(logits, labels[i : i + batch_size], reduction="sum").item()
        predictions.append(logits.argmax(1))
    predicted = torch.cat(predictions) if predictions else labels.new_zeros(0)
    confusion = torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10).cpu()
    n = max(len(images), 1)
    correct = int((predicted == labels).sum())
    return EvalResult(total_loss / n, correct / n, confusion.tolist(), predicted.cpu())


def save_model(model: Net, path: Path, metadata: dict[str, str]) -> None:
    st = deps.safetensors_torch()
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format": FORMAT,
        "arch": ARCH,
        "channels": ",".join(map(str, model.channels)),
        "mean": str(MEAN),
        "std": str(STD),
        **metadata,
    }
    with atomic_path(path) as tmp:
        st.save_file(tensors, str(tmp), metadata=meta)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[Net, dict[str, str]]:
    """A saved model (safetensors: tensors only, no code is unpickled) and its metadata."""
    st = deps.safetensors_torch()
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"no MNIST model at {path}", hint="train one with `selfhost train mnist`")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = st.load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise IntegrityError(f"{path} is not a readable safetensors file: {exc}") from None
    if metadata.get("format") != FORMAT:
        raise IntegrityError(f"{path} is not a selfhost MNIST model (format {metadata.get('format')!r})")
    if metadata.get("arch") != ARCH:
        raise IntegrityError(
            f"{path} holds another network layout ({metadata.get('arch')!r})",
            hint="train it again with this version of selfhost",
        )
    model = Net(_channels(path, metadata.get("channels")))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as exc:
        raise IntegrityError(
            f"{path} does not match the MNIST network: {' '.join(str(exc).split())[:300]}"
        ) from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise IntegrityError(f"{path} is damaged: {name} holds NaN or infinite weights")
    return model.to(device).eval(), metadata


MAX_CHANNELS = 1024  # per layer; the default net uses 32/64/128


def _channels(path: Path, text: Any) -> tuple[int, int, int]:
    """The three layer widths from the metadata, bounded before any weight is allocated."""
    parts = text.split(",") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.strip().isdigit() and 1 <= int(p) <= MAX_CHANNELS for p in parts):
        raise IntegrityError(
            f"{path} is damaged: its channels metadata {str(text)[:40]!r} "
            f"is not three widths in 1..{MAX_CHANNELS}"
        )
    c1, c2, c3 = (int(p) for p in parts)
    return c1, c2, c3


# ---- the training loop ------------------------------------------------------------------------


def make_schedule(
    optimizer: torch.optim.Optimizer, lr: float, steps: int
) -> torch.optim.lr_scheduler.OneCycleLR:
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.25
    )


def train(config: TrainConfig) -> Iterator[Event]:
    """Train (or resume) a Net; yields Started, Step, EpochEnd per epoch and Finished."""
    if config.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if config.lr <= 0:
        raise UsageError("--lr must be positive")
    if config.epochs is not None and config.epochs < 1:
        raise UsageError("--epochs must be at least 1")
    out = Path(config.out) if config.out else default_out()
    model_path, state_path = out / MODEL_FILE, out / STATE_FILE
    device = pick_device(config.device)
    threads = config.threads or cpu_count()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(config.seed)

    # Resume: weights from model.safetensors, optimizer/schedule from train_state.pt (tensors only).
    state = None
    if config.resume:
        if not model_path.is_file() or not state_path.is_file():
            raise NotFoundError(f"nothing to resume in {out}", hint="train without --resume first")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise IntegrityError(f"{state_path} is unreadable: {exc}") from None
    model = Net(config.channels)
    start_epoch, planned = 0, config.epochs or DEFAULT_EPOCHS
    if state is not None:
        model, metadata = load_model(model_path)
        start_epoch = int(state["epoch"])
        if int(metadata.get("epochs_done", -1)) != start_epoch:
            raise IntegrityError(f"{model_path} and {state_path} are from different epochs")
        planned = config.epochs or int(state["epochs"])
        if planned <= start_epoch:
            raise UsageError(
                f"the run in {out} has already trained {start_epoch} epochs",
                hint=f"pass --epochs larger than {start_epoch} to train more",
            )
    model = model.to(device)

    data_dir = Path(config.data) if config.data else None
    if data_dir is None:
        data_dir = yield from download_mnist()
    data = load_tensors(data_dir, device, config.train_limit, config.test_limit)
    n = len(data.train_x)
    if n == 0:
        raise UsageError("no training images selected")
    batch = min(config.batch_size, n)
    steps = n // batch  # the last partial batch is dropped: every step sees a full batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    same_plan = state is not None and (planned, steps) == (int(state["epochs"]), int(state.get("steps", -1)))
    if same_plan:
        schedule = make_schedule(optimizer, config.lr, planned * steps)
        optimizer.load_state_dict(state["optimizer"])  # after: OneCycleLR's constructor resets the lr
        schedule.load_state_dict(state["scheduler"])
    else:  # a new run, or a run extended/changed: a fresh one-cycle over the remaining epochs
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        schedule = make_schedule(optimizer, config.lr, (planned - start_epoch) * steps)

    yield Started(
        str(device),
        threads if device.type == "cpu" else 0,
        n,
        len(data.test_x),
        start_epoch,
        planned,
        steps,
        sum(p.numel() for p in model.parameters()),
        out,
        batch,
    )
    began = time.perf_counter()
    result = EvalResult(float("nan"), 0.0)
    for epoch in range(start_epoch + 1, planned + 1):
        generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(n, generator=generator, device=device)
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        report_every = max(steps // 50, 1)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            x = data.train_x[index].float().div_(255).unsqueeze(1)  # (B, 1, 28, 28) in [0, 1]
            if config.augment:
                x = augment(x, generator)
            y = data.train_y[index]
            logits = model((x - MEAN) / STD)
            # Raw logits: cross_entropy applies log_softmax itself.
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if (step + 1) % report_every == 0 or step + 1 == steps:
                yield Step(epoch, step + 1, steps, float(loss_sum) / (step + 1), schedule.get_last_lr()[0])
        train_seconds = time.perf_counter() - epoch_start
        result = evaluate(model, data.test_x, data.test_y)
        epoch_seconds = time.perf_counter() - epoch_start

        metadata = {
            "epochs_done": str(epoch),
            "epochs": str(planned),
            "seed": str(config.seed),
            "test_accuracy": f"{result.accuracy:.6f}",
            "n_train": str(n),
            "config": json.dumps({k: str(v) for k, v in asdict(config).items()}),
        }
        with atomic_path(state_path) as tmp:
            torch.save(
                {
                    "epoch": epoch,
                    "epochs": planned,
                    "steps": steps,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                },
                tmp,
            )
        save_model(model, model_path, metadata)
        yield EpochEnd(
            epoch,
            planned,
            float(loss_sum) / steps,
            int(correct) / (steps * batch),
            result.loss,
            result.accuracy,
            steps * batch / train_seconds,
            time.perf_counter() - began,
            (planned - epoch) * epoch_seconds,
        )
    yield Finished(result.accuracy, result.confusion, model_path, planned, time.perf_counter() - began)
