"""Run `selfhost train gpt ARGS` as one torchrun worker and record what this rank saw (test helper).

usage: torchrun ... tests/fakes/ddp_driver.py OUT_DIR ARGS...   Writes OUT_DIR/rank<R>.batches (one line per
training batch: the window starts) and OUT_DIR/rank<R>.pt (this rank's final model parameters).
Nothing is mocked: the real sampler and the real DistributedDataParallel are only observed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.parallel

from selfhost.train.gpt import data

out, args = Path(sys.argv[1]), sys.argv[2:]
rank = int(os.environ["RANK"])
wrapped: list[torch.nn.Module] = []
real_next, real_ddp = data.BatchSampler.next, torch.nn.parallel.DistributedDataParallel


def recording_next(self: data.BatchSampler) -> tuple:
    x, y = real_next(self)
    if getattr(self, "is_training_sampler", False):
        with open(out / f"rank{rank}.batches", "a") as fh:
            fh.write(" ".join(str(int(v)) for v in x.ravel()) + "\n")
    return x, y


class RecordingDDP(real_ddp):  # type: ignore[misc, valid-type]
    def __init__(self, module: torch.nn.Module, *a: object, **kw: object) -> None:
        super().__init__(module, *a, **kw)
        wrapped.append(module)


real_init = data.BatchSampler.__init__
built: list[int] = []


def recording_init(self: data.BatchSampler, arr, block_size: int, batch_size: int, seed: int) -> None:  # noqa: ANN001
    real_init(self, arr, block_size, batch_size, seed)
    self.is_training_sampler = not built  # the trainer builds its training sampler first, eval ones later
    built.append(seed)


data.BatchSampler.__init__ = recording_init  # type: ignore[method-assign]
data.BatchSampler.next = recording_next  # type: ignore[method-assign]
torch.nn.parallel.DistributedDataParallel = RecordingDDP  # type: ignore[misc]

from selfhost.cli.app import main  # noqa: E402

sys.argv = ["selfhost", *args]
try:
    main()
finally:
    if wrapped:
        weights = {k: v.detach().clone() for k, v in wrapped[0].state_dict().items()}
        torch.save(weights, out / f"rank{rank}.pt")
