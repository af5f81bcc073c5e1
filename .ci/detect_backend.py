#!/usr/bin/env python3
"""Which accelerator .ci/setup builds for: llama.cpp's CMAKE_ARGS and the PyTorch wheel to install.

Runs with a bare python3 (standard library only), before the virtualenv has anything in it.
`decide(probe)` is a pure function of what the machine reports (tests feed it fake command output);
`probe_machine()` asks the real machine; `python3 .ci/detect_backend.py` prints shell assignments
that .ci/setup evaluates (`--explain` prints the same decision for people).

- no GPU: CPU kernels, -DGGML_NATIVE=OFF (+ AVX-512 flags when the CPU has avx512vnni); CPU torch.
- NVIDIA GPU + CUDA toolkit (nvcc): -DGGML_CUDA=on for the GPU's own compute capability; CUDA torch.
- NVIDIA GPU, no nvcc: llama.cpp can only be built for the CPU (one line says what to install);
  PyTorch's CUDA wheels bring their own runtime, so training still uses the GPU.
- Apple Silicon: Metal (llama.cpp's default there); the standard torch wheel has MPS.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

TORCH_VERSION = "2.13.0"  # pinned: the CPU wheel on CPU machines, the CUDA wheel where a GPU is
CPU_FLAGS = "-DGGML_NATIVE=OFF"  # AVX2/FMA/F16C, runs on any x86-64 from the last decade
AVX512_FLAGS = ("-DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
                "-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON")  # fmt: skip
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/{tag}"
# PyTorch CUDA wheels by the newest CUDA the driver supports (nvidia-smi's "CUDA Version"), newest first.
TORCH_CUDA_TAGS = ((13, 0, "cu130"), (12, 8, "cu128"), (12, 6, "cu126"))
CUDA_TOOLKIT_HINT = "install the CUDA toolkit (nvcc): https://developer.nvidia.com/cuda-downloads"


@dataclass
class Probe:
    """What the machine says. None: the command is missing (or failed)."""

    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64, aarch64
    cpuinfo: str = ""  # /proc/cpuinfo
    compute_caps: str | None = None  # nvidia-smi --query-gpu=compute_cap --format=csv,noheader
    gpu_names: str | None = None  # nvidia-smi --query-gpu=name --format=csv,noheader
    smi_header: str | None = None  # plain `nvidia-smi` (its "CUDA Version: 12.8" line)
    nvcc: str | None = None  # path of nvcc, if any
    nvcc_on_path: bool = True


@dataclass
class Plan:
    backend: str  # cpu | cuda | metal
    cmake_args: str
    torch_spec: str = f"torch=={TORCH_VERSION}"
    torch_index: str = ""  # extra pip --index-url ("" = the default indexes)
    torch_check: str = "import torch"  # the installed torch is right when this runs
    llama_check: str = "import llama_cpp"  # the installed llama-cpp-python is right when this runs
    notes: list[str] = field(default_factory=list)

    def shell(self) -> str:
        values = {"BACKEND": self.backend, "CMAKE_FLAGS": self.cmake_args, "TORCH_SPEC": self.torch_spec,
                  "TORCH_INDEX": self.torch_index, "TORCH_CHECK": self.torch_check,
                  "LLAMA_CHECK": self.llama_check, "NOTES": "\n".join(self.notes)}  # fmt: skip
        return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def cpu_flags(cpuinfo: str) -> str:
    return f"{CPU_FLAGS} {AVX512_FLAGS}" if "avx512vnni" in cpuinfo else CPU_FLAGS


def cuda_architectures(compute_caps: str | None) -> str | None:
    """"8.9\\n8.6" -> "86;89" (CMAKE_CUDA_ARCHITECTURES); None when nvidia-smi could not say."""
    found = re.finditer(r"(\d+)\.(\d+)", compute_caps or "")
    caps = sorted({m.group(1) + m.group(2) for m in found}, key=int)
    return ";".join(caps) or None


def driver_cuda_version(smi_header: str | None) -> tuple[int, int] | None:
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", smi_header or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def torch_cuda_tag(driver: tuple[int, int] | None) -> str | None:
    if driver is None:
        return TORCH_CUDA_TAGS[-1][2]  # unknown driver version: the oldest CUDA build
    for major, minor, tag in TORCH_CUDA_TAGS:
        if driver >= (major, minor):
            return tag
    return None


def decide(probe: Probe) -> Plan:
    if probe.system == "Darwin" and probe.machine in ("arm64", "aarch64"):
        plan = Plan("metal", "-DGGML_METAL=on")
        plan.llama_check = "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"
        return plan
    if probe.compute_caps is None and probe.gpu_names is None:  # no NVIDIA GPU (or no driver)
        return Plan("cpu", cpu_flags(probe.cpuinfo))
    gpu = ", ".join(n.strip() for n in (probe.gpu_names or "NVIDIA GPU").splitlines() if n.strip())
    plan = Plan("cpu", cpu_flags(probe.cpuinfo))
    tag = torch_cuda_tag(driver_cuda_version(probe.smi_header))
    if tag is None:
        plan.notes.append(f"{gpu}: the driver is too old for PyTorch's CUDA wheels (CUDA < 12.6): "
                          "training runs on the CPU; update the NVIDIA driver")  # fmt: skip
    else:
        plan.torch_spec = f"torch=={TORCH_VERSION}+{tag}"  # the local label: a CPU build is not "installed"
        plan.torch_index = TORCH_CUDA_INDEX.format(tag=tag)
        plan.torch_check = "import torch; assert torch.version.cuda"
    if probe.nvcc is None:
        plan.notes.append(f"{gpu} found but no CUDA toolkit (nvcc): chat runs on the CPU; "
                          f"{CUDA_TOOLKIT_HINT}, then run .ci/setup again")  # fmt: skip
        return plan
    args = ["-DGGML_CUDA=on"]
    arch = cuda_architectures(probe.compute_caps)
    if arch:
        args.append(f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    else:
        plan.notes.append("nvidia-smi did not report the compute capability: building for llama.cpp's "
                          "default list of GPU architectures (slower build)")  # fmt: skip
    if not probe.nvcc_on_path:
        args.append(f"-DCMAKE_CUDA_COMPILER={probe.nvcc}")
    plan.backend, plan.cmake_args = "cuda", " ".join(args)
    plan.llama_check = "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())"
    return plan


# -- the real machine ----------------------------------------------------------------------------
def _run(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def find_nvcc() -> tuple[str | None, bool]:
    """(path, whether on PATH): PATH first, then $CUDA_HOME or $CUDA_PATH if set, else /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found, True
    given = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    roots = [r for r in given if r] or ["/usr/local/cuda"]
    for root in roots:
        if os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc"), False
    return None, False


def probe_machine(cpuinfo_path: str = "/proc/cpuinfo") -> Probe:
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as fh:
            cpuinfo = fh.read()
    except OSError:
        cpuinfo = ""
    probe = Probe(platform.system(), platform.machine(), cpuinfo)
    if shutil.which("nvidia-smi"):
        probe.compute_caps = _run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"])
        probe.gpu_names = _run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"])
        probe.smi_header = _run(["nvidia-smi"])
        if not (probe.gpu_names or "").strip():  # nvidia-smi without a working GPU/driver
            probe.compute_caps = probe.gpu_names = None
        probe.nvcc, probe.nvcc_on_path = find_nvcc()
    return probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--explain", action="store_true", help="print the decision for people, not the shell")
    ap.add_argument("--cpuinfo", default="/proc/cpuinfo", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    plan = decide(probe_machine(args.cpuinfo))
    if args.explain:
        print(f"backend     {plan.backend}")
        print(f"CMAKE_ARGS  {plan.cmake_args}")
        print(f"torch       {plan.torch_spec}" + (f" from {plan.torch_index}" if plan.torch_index else ""))
        for note in plan.notes:
            print(f"note        {note}")
    else:
        sys.stdout.write(plan.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
