"""Train and test loops (pytorch/examples mnist shape: Net, train, test, main) yielding selfhost.events.

The whole dataset lives in memory as one uint8 tensor on the training device; batches are made by
indexing it with a seeded permutation (no DataLoader, no workers). Every epoch ends with a test pass
and an atomic checkpoint (`model.safetensors` + `train_state.pt`), so Ctrl-C loses at most one epoch
and `resume=True` continues from the last one. `train()` yields a Notice (the start line), Progress
of the task "epoch N" (metrics: loss, lr) and of the task "test" (one per epoch: the epoch's train
and test metrics), and ends with Result(TrainResult); the run records its own metrics.jsonl/run.json.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from selfhost import paths
from selfhost.atomic import atomic_path
from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.events import Events, Notice, Progress, Result
from selfhost.train import runs
from selfhost.train.common import TrainSettings, pick_device, require, require_torch, resolve_threads
from selfhost.train.mnist.download import download_mnist
from selfhost.train.mnist.net import ARCH, DEFAULT_CHANNELS, MEAN, STD, Net, normalise

torch = require_torch(passive_openmp=True)
F = torch.nn.functional

FORMAT = "selfhost-mnist"
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
DEFAULT_EPOCHS = 5


def default_out() -> Path:
    return paths.runs_dir() / "mnist"


def default_model() -> Path:
    return default_out() / MODEL_FILE


class TrainConfig(TrainSettings):
    epochs: int | None = Field(None, ge=1)  # None: DEFAULT_EPOCHS, or what the resumed run planned
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)  # peak learning rate of the one-cycle schedule
    weight_decay: float = Field(5e-4, ge=0)
    augment: bool = True
    out: Path | None = None  # default: SELFHOST_HOME/runs/mnist
    data: Path | None = None  # the four IDX files; default: download into SELFHOST_HOME/data/mnist
    resume: bool = False
    train_limit: int | None = Field(None, ge=0)  # train on the first N training images only
    test_limit: int | None = Field(None, ge=0)  # evaluate on the first N test images only
    channels: tuple[int, int, int] = DEFAULT_CHANNELS
    tensorboard: bool = False  # also write TensorBoard event files (run/tensorboard)

    def settings(self) -> dict[str, Any]:
        """What run.json records: the settings that shape the model (not where files go)."""
        return self.model_dump(mode="json", exclude={"out", "data", "resume", "tensorboard"})


@dataclass
class TrainResult:
    test_accuracy: float
    confusion: list[list[int]]  # confusion[true][predicted]
    model_path: Path
    epochs: int
    elapsed_s: float


# ---- data -------------------------------------------------------------------------------------


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
    st = require("safetensors.torch", "safetensors")
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


def load_classifier(path: Path, device: torch.device | str = "cpu") -> tuple[Net, dict[str, str]]:
    """A saved model (safetensors: tensors only, no code is unpickled) and its metadata."""
    st = require("safetensors.torch", "safetensors")
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


def train(config: TrainConfig) -> Events:
    """Train (or resume) a Net: the start Notice, Progress per step and per epoch, Result(TrainResult)."""
    if config.tensorboard:
        runs.require_tensorboard()  # fail before anything is written
    out = Path(config.out) if config.out else default_out()
    device = pick_device(config.device)
    threads = resolve_threads(config.threads, device, free_cores_only=False)
    torch.manual_seed(config.seed)
    model, state, start_epoch, planned = load_for_resume(config, out)
    model = model.to(device)

    data_dir = Path(config.data) if config.data else (yield from download_mnist())
    data = load_tensors(data_dir, device, config.train_limit, config.test_limit)
    if len(data.train_x) == 0:
        raise UsageError("no training images selected")
    batch = min(config.batch_size, len(data.train_x))
    steps = len(data.train_x) // batch  # the last partial batch is dropped: every step sees a full batch
    optimizer, schedule = make_optimizer(model, config, state, planned - start_epoch, steps)
    run = EpochRunner(config, model, data, optimizer, schedule, device, batch, steps, planned, out)

    parameters = sum(p.numel() for p in model.parameters())
    cpu_threads = (threads or torch.get_num_threads()) if device.type == "cpu" else 0
    info = {"device": str(device), "threads": cpu_threads, "n_train": len(data.train_x),
            "n_test": len(data.test_x), "params": parameters, "max_steps": planned * steps,
            "epochs": planned, "steps_per_epoch": steps, "config": config.settings()}  # fmt: skip
    run.recorder = runs.RunRecorder(out, "mnist", info, start_step=start_epoch * steps,
                                    keep=lambda row: row.get("epoch", 0) <= start_epoch,
                                    tensorboard=config.tensorboard, data=config.data)  # fmt: skip
    where = f"{cpu_threads} CPU threads" if cpu_threads else "GPU"
    resumed = f", resuming after epoch {start_epoch}" if start_epoch else ""
    yield Notice(f"training on {device} ({where}): {len(data.train_x):,} images, test {len(data.test_x):,}, "
                 f"{parameters:,} parameters, {planned} epochs{resumed}")  # fmt: skip
    run.began = time.perf_counter()
    with runs.recording(run.recorder):
        for epoch in range(start_epoch + 1, planned + 1):
            yield from run.epoch(epoch)
        run.recorder.end("done", exported={"name": None, "path": str(run.model_path)})
    result = run.result
    yield Result(TrainResult(result.accuracy, result.confusion, run.model_path, planned,
                             time.perf_counter() - run.began))  # fmt: skip


def load_for_resume(config: TrainConfig, out: Path) -> tuple[Net, dict[str, Any] | None, int, int]:
    """A new Net, or the run's weights (model.safetensors) and optimizer/schedule state (train_state.pt,
    tensors only); with the epochs done and the epochs planned."""
    model_path, state_path = out / MODEL_FILE, out / STATE_FILE
    planned = config.epochs or DEFAULT_EPOCHS
    if not config.resume:
        return Net(config.channels), None, 0, planned
    if not model_path.is_file() or not state_path.is_file():
        raise NotFoundError(f"nothing to resume in {out}", hint="train without --resume first")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise IntegrityError(f"{state_path} is unreadable: {exc}") from None
    model, metadata = load_classifier(model_path)
    start_epoch = int(state["epoch"])
    if int(metadata.get("epochs_done", -1)) != start_epoch:
        raise IntegrityError(f"{model_path} and {state_path} are from different epochs")
    planned = config.epochs or int(state["epochs"])
    if planned <= start_epoch:
        raise UsageError(
            f"the run in {out} has already trained {start_epoch} epochs",
            hint=f"pass --epochs larger than {start_epoch} to train more",
        )
    return model, state, start_epoch, planned


def make_optimizer(
    model: Net, config: TrainConfig, state: dict[str, Any] | None, remaining_epochs: int, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.OneCycleLR]:
    """AdamW and its one-cycle schedule; a resumed run with the same plan continues both exactly."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    planned = remaining_epochs + (int(state["epoch"]) if state is not None else 0)
    same_plan = state is not None and (planned, steps) == (int(state["epochs"]), int(state.get("steps", -1)))
    if same_plan:
        schedule = make_schedule(optimizer, config.lr, planned * steps)
        optimizer.load_state_dict(state["optimizer"])  # after: OneCycleLR's constructor resets the lr
        schedule.load_state_dict(state["scheduler"])
    else:  # a new run, or a run extended/changed: a fresh one-cycle over the remaining epochs
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        schedule = make_schedule(optimizer, config.lr, remaining_epochs * steps)
    return optimizer, schedule


@dataclass
class EpochRunner:
    """One epoch at a time: the training steps, the test pass, the checkpoint, the records."""

    config: TrainConfig
    model: Net
    data: Tensors
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.OneCycleLR
    device: torch.device
    batch: int
    steps: int
    planned: int
    out: Path
    recorder: runs.RunRecorder | None = None
    began: float = field(default_factory=time.perf_counter)
    result: EvalResult = field(default_factory=lambda: EvalResult(float("nan"), 0.0))
    logged: tuple[int, float, float] = (0, 0.0, 0.0)  # step within the epoch, summed loss, time

    @property
    def model_path(self) -> Path:
        return self.out / MODEL_FILE

    def epoch(self, epoch: int) -> Events:
        """Train one epoch, test, save; yields Progress of "epoch N" and then of "test"."""
        config, data, batch, steps = self.config, self.data, self.batch, self.steps
        generator = torch.Generator(device=self.device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(data.train_x), generator=generator, device=self.device)
        self.model.train()
        epoch_start = time.perf_counter()
        self.logged = (0, 0.0, epoch_start)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        report_every = max(steps // 50, 1)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            x = data.train_x[index].float().div_(255).unsqueeze(1)  # (B, 1, 28, 28) in [0, 1]
            if config.augment:
                x = augment(x, generator)
            y = data.train_y[index]
            logits = self.model((x - MEAN) / STD)
            # Raw logits: cross_entropy applies log_softmax itself.
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.schedule.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if (step + 1) % report_every == 0 or step + 1 == steps:
                yield self.step_progress(epoch, step + 1, float(loss_sum))
        train_seconds = time.perf_counter() - epoch_start
        self.result = evaluate(self.model, data.test_x, data.test_y)
        epoch_seconds = time.perf_counter() - epoch_start
        self.save(epoch)
        metrics = {"train_loss": float(loss_sum) / steps, "train_accuracy": int(correct) / (steps * batch),
                   "test_loss": self.result.loss, "test_accuracy": self.result.accuracy}  # fmt: skip
        images_per_s = steps * batch / train_seconds
        self.record({"step": epoch * steps, "epoch": epoch, **metrics,
                     "images_per_s": round(images_per_s, 1)})  # fmt: skip
        yield Progress("test", epoch, self.planned, "epochs", metrics={
            **metrics, "images_per_s": images_per_s, "elapsed_s": time.perf_counter() - self.began,
            "eta_s": (self.planned - epoch) * epoch_seconds})  # fmt: skip

    def step_progress(self, epoch: int, step: int, loss_total: float) -> Progress:
        """Progress of the epoch (its running mean loss); the metrics row of the steps since the last."""
        lr = self.schedule.get_last_lr()[0]
        last_step, last_total, last_time = self.logged
        now = time.perf_counter()
        if self.recorder is not None:
            self.recorder.row({
                "kind": "train", "step": (epoch - 1) * self.steps + step, "epoch": epoch,
                "loss": (loss_total - last_total) / max(1, step - last_step), "lr": lr,
                "images_per_s": round((step - last_step) * self.batch / max(now - last_time, 1e-9), 1),
            })  # fmt: skip
        self.logged = (step, loss_total, now)
        return Progress(f"epoch {epoch}", step, self.steps, "steps", detail=f"loss {loss_total / step:.4f}",
                        metrics={"loss": loss_total / step, "lr": lr})  # fmt: skip

    def record(self, row: dict[str, Any]) -> None:
        if self.recorder is not None:
            self.recorder.eval_row(row, "test_accuracy", higher_is_better=True)

    def save(self, epoch: int) -> None:
        """model.safetensors (weights + metadata) and train_state.pt (optimizer, schedule), atomically."""
        config = self.config
        metadata = {
            "epochs_done": str(epoch),
            "epochs": str(self.planned),
            "seed": str(config.seed),
            "test_accuracy": f"{self.result.accuracy:.6f}",
            "n_train": str(len(self.data.train_x)),
            "config": json.dumps({k: str(v) for k, v in config.model_dump().items()}),
        }
        with atomic_path(self.out / STATE_FILE) as tmp:
            torch.save({"epoch": epoch, "epochs": self.planned, "steps": self.steps,
                        "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict()},
                       tmp)  # fmt: skip
        save_model(self.model, self.model_path, metadata)

