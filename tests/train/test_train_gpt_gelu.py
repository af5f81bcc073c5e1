"""The model's GELU is llama.cpp's (the tanh approximation), however it is computed on the CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

from selfhost.train.gpt.model import GPT, GELUTanh, GPTConfig  # noqa: E402


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_cpu_gelu_is_the_tanh_approximation_with_its_gradient(dtype: torch.dtype, tol: float) -> None:
    x = torch.linspace(-12, 12, 4001, dtype=dtype).requires_grad_(True)
    g = torch.randn(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    ours = GELUTanh()(x)
    theirs = F.gelu(x, approximate="tanh")
    assert ours.grad_fn is not None and type(ours.grad_fn).__name__ != type(theirs.grad_fn).__name__
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_theirs,) = torch.autograd.grad(theirs, x, g)
    assert (ours - theirs).abs().max().item() <= tol
    assert (grad_ours - grad_theirs).abs().max().item() <= 4 * tol
    with torch.no_grad():  # inference (evals, sampling, export checks) takes the forward-only path
        assert (GELUTanh()(x) - theirs).abs().max().item() <= tol
    assert GELUTanh()(x.detach()).grad_fn is None


def test_a_training_step_matches_the_tanh_gelu_model() -> None:
    """One forward + backward of the GPT equals the same GPT with F.gelu(approximate="tanh")."""
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    ours = GPT(cfg).double()
    reference = GPT(cfg).double()
    reference.load_state_dict(ours.state_dict())
    for block in reference.blocks:
        block.mlp.gelu = torch.nn.GELU(approximate="tanh")
    idx = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))
    losses = []
    for model in (ours, reference):
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-12)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12), name
