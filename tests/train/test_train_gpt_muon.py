"""BatchedMuon (selfhost.train.gpt.muon) is torch.optim.Muon with batched orthogonalization: same updates,
same state, for square, wide and tall matrices, with and without Nesterov, weight decay and lr adjustment."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from selfhost.train.gpt.muon import BatchedMuon  # noqa: E402

SHAPES = [(16, 16), (16, 16), (40, 16), (40, 16), (16, 40), (8, 24)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _run(cls: type, steps: int, **kwargs: object) -> tuple[list, torch.optim.Optimizer]:
    params = _params(0)
    opt = cls(params, lr=0.02, momentum=0.95, **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params[:-1]:  # the last one has no gradient: skipped, as torch does
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kwargs", [{}, {"nesterov": False, "weight_decay": 0.1},
                                    {"adjust_lr_fn": "match_rms_adamw"}])  # fmt: skip
def test_batched_muon_matches_torch_muon(kwargs: dict) -> None:
    ours, ours_opt = _run(BatchedMuon, 3, **kwargs)
    ref, ref_opt = _run(torch.optim.Muon, 3, **kwargs)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    start = _params(0)
    assert not torch.equal(ours[0], start[0]) and torch.equal(ours[-1], start[-1])
    for a, b in zip(ours_opt.state.values(), ref_opt.state.values(), strict=True):
        torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"], rtol=0, atol=0)


def test_state_dicts_load_across_the_two_classes() -> None:
    _, ref_opt = _run(torch.optim.Muon, 2)
    params = _params(0)
    ours = BatchedMuon(params, lr=0.02, momentum=0.95)
    ours.load_state_dict(ref_opt.state_dict())
    assert [s["momentum_buffer"].shape for s in ours.state.values()] == [
        s["momentum_buffer"].shape for s in ref_opt.state.values()
    ]
