"""The CNN: three conv-batchnorm-relu-maxpool blocks and one linear layer (~30k parameters).

Small on purpose: with the default recipe (AdamW, one-cycle, 3 epochs) it passes 99% test accuracy
after two epochs and ends at ~99.4%, at ~3,400 images/s on two CPU cores (the pytorch/examples net
has 1.2M parameters and trains ~3x slower per image).
"""

from __future__ import annotations

from selfhost.train.mnist import deps

torch = deps.torch()
nn = torch.nn

DEFAULT_CHANNELS = (16, 32, 64)
MEAN, STD = 0.1307, 0.3081  # pixel statistics of the MNIST training set (on a 0-1 scale)


def conv_block(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),  # bias is redundant before BN
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class Net(nn.Module):
    def __init__(self, channels: tuple[int, int, int] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.channels = tuple(channels)
        self.features = nn.Sequential(
            conv_block(1, c1, 5),  # (B, 1, 28, 28) -> (B, c1, 14, 14)
            conv_block(c1, c2, 3),  # -> (B, c2, 7, 7)
            conv_block(c2, c3, 3),  # -> (B, c3, 3, 3)
        )
        self.classifier = nn.Linear(c3 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) normalised pixels -> (B, 10) logits (not probabilities)."""
        return self.classifier(self.features(x).flatten(1))


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """(B, 28, 28) uint8 with white ink on black -> (B, 1, 28, 28) float, the way the net was trained."""
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)
