"""Claims that need an NVIDIA GPU (a CUDA llama-cpp-python and PyTorch). Deselected by default
(tests/conftest.py: unless -m names gpu); bench/gpu.sh runs them with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfhost.chat.model import ChatModel, EngineOptions
from selfhost.runtime.jobs import Job, JobText
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.sampler import SamplingParams
from selfhost.runtime.speculative import SpecSettings

pytestmark = pytest.mark.gpu
QUESTION = [
    {"role": "system", "content": "Answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
]


def greedy(model: ChatModel, n: int = 24) -> str:
    model.engine.clear_cache()
    job = model.engine.submit(
        Job(model.tokenize_prompt(model.render(QUESTION)), SamplingParams(temperature=0), n)
    )
    return "".join(c.text for c in job.chunks() if isinstance(c, JobText))


def test_every_layer_is_offloaded_to_the_gpu(smollm2_gguf: Path) -> None:
    from selfhost.runtime.llama_backend import backend_info

    assert backend_info().gpu_offload, "this llama-cpp-python has no GPU backend: build it with .ci/setup"
    model = ChatModel.load(Path(smollm2_gguf), ctx=512)  # default: every layer on the GPU
    try:
        s = model.summary
        assert s.backend != "CPU" and s.layers_offloaded == s.n_layers > 0, s.line()
        assert "Paris" in greedy(model)
    finally:
        model.close()


@pytest.mark.parametrize(
    "options",
    [
        EngineOptions(spec=SpecSettings(mode="ngram")),
        EngineOptions(kv=KVSettings(type_k="q8_0", type_v="q8_0", flash_attn="on")),
    ],
    ids=["ngram", "kv-q8_0"],
)
def test_speculation_and_kv_types_on_the_gpu(smollm2_gguf: Path, options: EngineOptions) -> None:
    plain = ChatModel.load(Path(smollm2_gguf), ctx=512)
    reference = greedy(plain)
    plain.close()
    model = ChatModel.load(Path(smollm2_gguf), ctx=512, options=options)
    try:
        answer = greedy(model)
    finally:
        model.close()
    assert "Paris" in answer
    if options.kv.type_k == "f16":  # speculation: the same tokens exactly
        assert answer == reference


def test_torch_trains_on_the_gpu() -> None:
    import torch

    assert torch.cuda.is_available(), "PyTorch has no CUDA here: .ci/setup installs the CUDA wheel"
    x = torch.randn(256, 256, device="cuda", requires_grad=True)
    (x @ x).sum().backward()
    assert x.grad is not None and x.grad.is_cuda
