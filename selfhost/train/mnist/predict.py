"""Use a trained model: classify your own digit images, re-measure test accuracy.

Images are turned into MNIST's format the way MNIST itself was made: the digit's bounding box is
fitted into 20x20 (aspect ratio kept), then placed in a 28x28 frame so that its centre of mass is
in the centre; white ink on black, whatever the input's polarity.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from selfhost.errors import IntegrityError, NotFoundError, UsageError
from selfhost.events import Events, Result
from selfhost.train.common import pick_device, require

if TYPE_CHECKING:
    import numpy as np

INK_THRESHOLD = 0.2  # a pixel is part of the digit above this fraction of the strongest ink
MAX_PIXELS = 40_000_000  # checked from the header, before decoding (a 12000x12000 PNG fits in 42 KB)
WORK_SIDE = 1024  # larger images are scaled down to this before their pixels become floats


def load_ink(path: Path) -> np.ndarray:
    """The image as float 'ink' in [0, 1] (1 = stroke), background removed."""
    import numpy as np

    image_mod = require("PIL.Image", "Pillow (needed to read images)")
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: the size is checked right below
            warnings.simplefilter("ignore", image_mod.DecompressionBombWarning)
            opened = image_mod.open(path)  # reads the header only
        with opened as image:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise UsageError(
                    f"{path} is {width}x{height} pixels: more than the {MAX_PIXELS // 1_000_000} million "
                    "selfhost decodes for one digit",
                    hint="crop or scale the image down",
                )
            image.draft(None, (WORK_SIDE, WORK_SIDE))  # JPEG: decode at a reduced scale directly
            image.load()
            if max(image.size) > WORK_SIDE:  # 28x28 is the goal: no need to keep megapixels as floats
                image.thumbnail((WORK_SIDE, WORK_SIDE))
            rgba = image.convert("RGBA")
    except UsageError:
        raise
    except Exception as exc:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise IntegrityError(f"{path} is not a readable image: {exc}") from None
    pixels = np.asarray(rgba, dtype=np.float32) / 255.0  # (H, W, 4)
    alpha = pixels[..., 3]
    if alpha.min() < 0.99:  # drawn on a transparent canvas: opacity is the ink
        ink = alpha.copy()
    else:
        gray = pixels[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        background = float(np.median(border))
        # Dark-on-light (paper) or light-on-dark (MNIST): the border tells which is background.
        ink = background - gray if background > 0.5 else gray - background
    ink = np.clip(ink, 0.0, None)
    peak = float(ink.max())
    if peak < 0.05:
        raise UsageError(f"{path} looks blank: no digit found")
    return ink / peak


def to_mnist(ink: np.ndarray) -> np.ndarray:
    """Ink (H, W) in [0, 1] -> (28, 28) uint8 MNIST-style: 20x20 box, centred by centre of mass."""
    import numpy as np

    image_mod = require("PIL.Image", "Pillow (needed to read images)")
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    crop = np.where(crop > INK_THRESHOLD / 2, crop, 0.0)  # drop faint noise around the stroke
    h, w = crop.shape
    scale = 20.0 / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image_mod.fromarray((crop * 255).astype(np.uint8)).resize(size, image_mod.Resampling.LANCZOS)
    digit = np.asarray(small, dtype=np.float32)
    # Place it so the centre of mass lands on (14, 14), clipped to the frame.
    ys, xs = np.indices(digit.shape)
    mass = digit.sum()
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    top = int(np.clip(round(14 - cy), 0, 28 - digit.shape[0]))
    left = int(np.clip(round(14 - cx), 0, 28 - digit.shape[1]))
    frame = np.zeros((28, 28), dtype=np.float32)
    frame[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.clip(frame * (255.0 / max(frame.max(), 1e-6)), 0, 255).astype(np.uint8)


def preprocess(path: Path) -> np.ndarray:
    """Any PNG/JPG/... of one digit -> (28, 28) uint8, white ink on black."""
    return to_mnist(load_ink(path))


@dataclass
class Prediction:
    path: Path
    digit: int
    top: list[tuple[int, float]]  # the 3 most likely digits with their probabilities


def predict(images: list[Path], model_path: Path | None = None, device: str = "cpu") -> Iterator[Prediction]:
    """Classify each image with the saved model (default: the last `selfhost train mnist`)."""
    from selfhost.train.mnist.net import normalise
    from selfhost.train.mnist.train import default_model, load_classifier, torch

    model, _ = load_classifier(model_path or default_model(), pick_device(device))
    dev = next(model.parameters()).device
    for path in images:
        pixels = torch.from_numpy(preprocess(path)).to(dev)
        with torch.no_grad():
            probs = torch.softmax(model(normalise(pixels.unsqueeze(0))), dim=1)[0].cpu()
        values, digits = probs.topk(3)
        top = [(int(d), float(v)) for d, v in zip(digits, values, strict=True)]
        yield Prediction(Path(path), top[0][0], top)


@dataclass
class Misclassified:
    index: int  # position in the test set
    true: int
    predicted: int
    image: np.ndarray  # (28, 28) uint8, white ink on black


@dataclass
class EvalReport:
    model_path: Path
    accuracy: float
    loss: float
    n: int
    confusion: list[list[int]]
    metadata: dict[str, str]
    errors: list[Misclassified] = field(default_factory=list)  # the first `max_errors` mistakes

    def to_json(self) -> dict[str, object]:
        """The report without the pixels of the misclassified digits."""
        return {"model": str(self.model_path), "accuracy": self.accuracy, "loss": self.loss, "n": self.n,
                "confusion": self.confusion, "epochs_done": self.metadata.get("epochs_done"),
                "errors": [{"index": e.index, "true": e.true, "predicted": e.predicted} for e in self.errors]}


def evaluate_saved(
    model_path: Path | None = None,
    data: Path | None = None,
    device: str = "auto",
    limit: int | None = None,
    max_errors: int = 0,
) -> Events:
    """Re-measure a saved model on the MNIST test set: the download's events, then Result(EvalReport)
    (with up to `max_errors` misclassified test images)."""
    from selfhost.train.mnist.download import download_mnist
    from selfhost.train.mnist.train import default_model, evaluate, load_classifier, load_tensors

    dev = pick_device(device)
    path = Path(model_path) if model_path else default_model()
    model, metadata = load_classifier(path, dev)
    data_dir = Path(data) if data else (yield from download_mnist())
    tensors = load_tensors(data_dir, dev, train_limit=0, test_limit=limit)
    result = evaluate(model, tensors.test_x, tensors.test_y)
    errors = []
    if max_errors > 0 and result.predicted is not None:
        labels = tensors.test_y.cpu()
        wrong = (result.predicted != labels).nonzero().flatten()[:max_errors].tolist()
        images = tensors.test_x.cpu().numpy()
        errors = [Misclassified(i, int(labels[i]), int(result.predicted[i]), images[i]) for i in wrong]
    yield Result(EvalReport(
        path, result.accuracy, result.loss, len(tensors.test_x), result.confusion, metadata, errors
    ))
