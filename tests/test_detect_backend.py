""".ci/detect_backend.py: what .ci/setup builds for, from fake command output (no GPU here)."""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / ".ci" / "detect_backend.py"
_spec = importlib.util.spec_from_file_location("detect_backend", SCRIPT)
db = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["detect_backend"] = db
_spec.loader.exec_module(db)  # type: ignore[union-attr]

OLD_AVX512 = ("-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
              "-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON")  # what .ci/setup always built before  # fmt: skip
SMI_HEADER = "| NVIDIA-SMI 570.86.15   Driver Version: 570.86.15   CUDA Version: 12.8 |\n"
RTX = dict(compute_caps="8.9\n", gpu_names="NVIDIA GeForce RTX 4090\n", smi_header=SMI_HEADER)


def show(name: str, plan) -> None:  # noqa: ANN001
    print(f"{name}: backend={plan.backend} CMAKE_ARGS='{plan.cmake_args}' torch={plan.torch_spec} "
          f"index={plan.torch_index or '-'} notes={plan.notes}")  # fmt: skip


def test_no_gpu_keeps_the_cpu_flags() -> None:
    plain = db.decide(db.Probe("Linux", "x86_64", "flags : fpu avx2 fma f16c"))
    show("no GPU", plain)
    assert plain.backend == "cpu" and plain.cmake_args == "-DGGML_NATIVE=OFF"
    assert (plain.torch_spec, plain.torch_index, plain.notes) == ("torch==2.13.0", "", [])
    assert (plain.torch_check, plain.llama_check) == ("import torch", "import llama_cpp")
    vnni = db.decide(db.Probe("Linux", "x86_64", "flags : avx2 avx512f avx512vnni avx512_bf16"))
    show("no GPU, AVX-512 VNNI", vnni)
    assert vnni.cmake_args == OLD_AVX512


def test_nvidia_gpu_with_nvcc_builds_cuda_for_its_architecture() -> None:
    plan = db.decide(db.Probe("Linux", "x86_64", "", nvcc="/usr/bin/nvcc", **RTX))
    show("RTX 4090 + nvcc", plan)
    assert plan.backend == "cuda" and plan.notes == []
    assert plan.cmake_args == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89"
    assert plan.torch_spec == "torch==2.13.0+cu128"
    assert plan.torch_index == "https://download.pytorch.org/whl/cu128"
    assert "torch.version.cuda" in plan.torch_check and "gpu_offload" in plan.llama_check
    # two different GPUs, nvcc outside PATH (CUDA_HOME), a CUDA 13 driver
    two = db.decide(db.Probe("Linux", "x86_64", "", compute_caps="9.0\n8.6\n", gpu_names="H100\nA10\n",
                             smi_header="CUDA Version: 13.0", nvcc="/opt/cuda/bin/nvcc", nvcc_on_path=False))
    show("H100 + A10, nvcc off PATH", two)
    assert two.cmake_args == ("-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=86;90 "
                              "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc")  # fmt: skip
    assert two.torch_index.endswith("/cu130")
    blackwell = db.decide(db.Probe("Linux", "x86_64", "", compute_caps="12.0", gpu_names="RTX 5090",
                                   smi_header="CUDA Version: 12.9", nvcc="/usr/bin/nvcc"))
    assert blackwell.cmake_args.endswith("ARCHITECTURES=120")
    # an old nvidia-smi without compute_cap: llama.cpp's default architectures, said in a note
    old = db.decide(db.Probe("Linux", "x86_64", "", compute_caps=None, gpu_names="Tesla T4",
                             smi_header="CUDA Version: 12.2", nvcc="/usr/bin/nvcc"))
    show("T4, old driver", old)
    assert old.cmake_args == "-DGGML_CUDA=on"
    assert old.torch_check == "import torch" and old.torch_spec == "torch==2.13.0"
    assert any("compute capability" in n for n in old.notes)
    assert any("driver is too old" in n for n in old.notes)


def test_gpu_without_nvcc_says_chat_runs_on_the_cpu() -> None:
    plan = db.decide(db.Probe("Linux", "x86_64", "", nvcc=None, **RTX))
    show("RTX 4090, no nvcc", plan)
    assert plan.backend == "cpu" and plan.cmake_args == "-DGGML_NATIVE=OFF"
    assert plan.torch_index.endswith("/cu128")  # PyTorch's wheels carry their own CUDA runtime
    (note,) = plan.notes
    assert "NVIDIA GeForce RTX 4090" in note and "chat runs on the CPU" in note and "CUDA toolkit" in note
    assert "\n" not in note


def test_apple_silicon_keeps_metal() -> None:
    plan = db.decide(db.Probe("Darwin", "arm64", ""))
    show("Apple Silicon", plan)
    assert (plan.backend, plan.cmake_args, plan.torch_spec) == ("metal", "-DGGML_METAL=on", "torch==2.13.0")
    intel_mac = db.decide(db.Probe("Darwin", "x86_64", ""))
    assert intel_mac.backend == "cpu"


def fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script, "utf-8")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def setup_variables(path: str, cpuinfo: Path) -> dict[str, str]:
    """Run the script as .ci/setup does (`eval` in bash) and read back the variables it sets."""
    names = ["BACKEND", "CMAKE_FLAGS", "TORCH_SPEC", "TORCH_INDEX", "NOTES"]
    show_vars = "; ".join(f'printf "%s\\0" "${n}"' for n in names)
    cmd = f'eval "$("{sys.executable}" "{SCRIPT}" --cpuinfo "{cpuinfo}")"; {show_vars}'
    env = {**os.environ, "PATH": path, "CUDA_HOME": "/nonexistent"}  # not this machine's toolkit
    out = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.split("\0")[:-1], strict=True))


@pytest.mark.skipif(not Path("/bin/sh").exists(), reason="needs a POSIX shell")
def test_the_script_reads_real_commands(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags : avx2 avx512vnni\n", "utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = f"{bin_dir}:/usr/bin:/bin"
    if Path("/usr/bin/nvidia-smi").exists() or Path("/bin/nvidia-smi").exists():
        pytest.skip("a real NVIDIA driver would answer before the fake one is written")
    print("this machine:", setup_variables(path, Path("/proc/cpuinfo")))
    assert setup_variables(path, cpuinfo)["CMAKE_FLAGS"] == OLD_AVX512
    fake_tool(bin_dir, "nvidia-smi", """case "$1" in
  --query-gpu=compute_cap) echo 8.9 ;;
  --query-gpu=name) echo "NVIDIA GeForce RTX 4090" ;;
  *) echo "| NVIDIA-SMI 570.86   Driver Version: 570.86   CUDA Version: 12.8 |" ;;
esac
""")
    no_nvcc = setup_variables(path, cpuinfo)
    print("GPU, no nvcc:", no_nvcc)
    assert no_nvcc["BACKEND"] == "cpu" and no_nvcc["CMAKE_FLAGS"] == OLD_AVX512
    assert "chat runs on the CPU" in no_nvcc["NOTES"]
    fake_tool(bin_dir, "nvcc", "echo 'Cuda compilation tools, release 12.8'\n")
    cuda = setup_variables(path, cpuinfo)
    print("GPU + nvcc:", cuda)
    assert cuda["CMAKE_FLAGS"] == "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=89"
    assert cuda["TORCH_SPEC"] == "torch==2.13.0+cu128" and cuda["NOTES"] == ""
    fake_tool(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9\n")
    assert setup_variables(path, cpuinfo)["BACKEND"] == "cpu"  # a broken driver is no GPU
