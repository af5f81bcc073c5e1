"""Benchmark `selfhost pull` against plain `hf_hub_download`: same file, same server, same run.

    .venv/bin/python bench/pull.py --size-mb 200

1. Throughput: the fake Hub (tests/fakes/hubserver.py, 127.0.0.1, in this process) serves one random
   random llama GGUF; selfhost's core `pull()` (download + sha256 verification + fsync + registration)
   and `hf_hub_download` (download only) each fetch it into a fresh cache, `--rounds` times; best wins.
2. Resume: the server drops the connection at 50% of the file. selfhost's next run fetches only the missing
   bytes; huggingface-hub's next run fetches everything again (its partial file is deleted on failure).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = "bench/random-GGUF"
FILE = "random-Q4_K_M.gguf"


def make_file(size: int) -> bytes:
    """A valid random llama GGUF of about `size` bytes (pull validates what it registers), its
    feed-forward width chosen to reach the size (2 layers x 3 matrices of n_ff x 64 F32)."""
    from tests.fakes.tinygguf import write_tiny_llama

    n_ff = max(128, size // (2 * 3 * 64 * 4))
    with tempfile.TemporaryDirectory() as folder:
        return write_tiny_llama(
            Path(folder) / "random.gguf", n_ff=n_ff, seed=secrets.randbelow(2**31)
        ).read_bytes()


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cut", type=float, default=0.5, help="where the resume test drops the connection")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="selfhost-bench-"))
    os.environ["SELFHOST_HOME"] = str(work / "selfhost")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

    from tests.fakes.hubserver import FakeHub

    size = args.size_mb * 1_000_000
    data = make_file(size)
    with FakeHub() as server:
        os.environ["HF_ENDPOINT"] = server.url
        import huggingface_hub.constants as hf_constants
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import disable_progress_bars

        hf_constants.ENDPOINT = server.url
        hf_constants.HUGGINGFACE_CO_URL_TEMPLATE = server.url + "/{repo_id}/resolve/{revision}/{filename}"
        disable_progress_bars()
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings
        from selfhost.errors import DownloadError
        from selfhost.events import run_to_end
        from selfhost.models.pull import pull
        from selfhost.models.store import Store

        server.add_file(REPO, FILE, data)

        def selfhost_pull(cache: Path, **kw: object) -> None:
            os.environ["HF_HUB_CACHE"] = str(cache)
            run_to_end(pull(f"{REPO}:Q4_K_M", **kw))

        def hf_pull(cache: Path) -> None:
            hf_hub_download(REPO, FILE, cache_dir=cache, endpoint=server.url)

        # -- 1. throughput ---------------------------------------------------------------------
        best = {"selfhost pull": float("inf"), "hf_hub_download": float("inf")}
        for i in range(args.rounds):
            for label, fn in (("selfhost pull", selfhost_pull), ("hf_hub_download", hf_pull)):
                cache = work / f"{label.split()[0]}-{i}"
                Store().manifest.unlink(missing_ok=True)
                best[label] = min(best[label], timed(lambda fn=fn, cache=cache: fn(cache)))
                _rm(cache)
        print(f"\nthroughput: {args.size_mb} MB file from 127.0.0.1, best of {args.rounds} (CPU: {_cpu()})")
        print(f"{'client':<18}{'seconds':>10}{'MB/s':>10}  note")
        notes = {"selfhost pull": "download + sha256 verify + register", "hf_hub_download": "download only"}
        for label, seconds in best.items():
            print(f"{label:<18}{seconds:>10.2f}{size / seconds / 1e6:>10.0f}  {notes[label]}")
        ratio = best["hf_hub_download"] / best["selfhost pull"]
        print(f"ratio selfhost/hf throughput: {ratio:.2f}x")

        # -- 2. resume after a cut at 50% ------------------------------------------------------
        cut = int(size * args.cut)
        server.cut_at[(REPO, FILE)] = cut
        rows = []
        cache = work / "resume-selfhost"
        Store().manifest.unlink(missing_ok=True)
        try:
            selfhost_pull(cache, retries=0)
        except DownloadError:
            pass
        server.cut_at.clear()
        server.reset_counters()
        selfhost_pull(cache)
        rows.append(("selfhost pull", server.bytes_served))

        server.cut_at[(REPO, FILE)] = cut
        cache = work / "resume-hf"
        start = time.perf_counter()
        try:
            hf_pull(cache)  # retries in-process 5 times (1 s apart), then deletes its partial file
        except Exception:
            pass
        hf_failed_s = time.perf_counter() - start
        server.cut_at.clear()
        server.reset_counters()
        hf_pull(cache)
        rows.append(("hf_hub_download", server.bytes_served))

        print(f"\nresume: connection dropped at {args.cut:.0%} ({cut / 1e6:.0f} MB), then run again")
        print(f"{'client':<18}{'re-downloaded MB':>18}{'of fresh':>10}{'saved':>8}")
        for label, served in rows:
            print(f"{label:<18}{served / 1e6:>18.1f}{served / size:>10.0%}{1 - served / size:>8.0%}")
        print(f"(hf_hub_download spent {hf_failed_s:.1f} s retrying the dropped transfer before giving up)")
    _rm(work)


def _rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} threads"
    except OSError:
        pass
    return f"{os.cpu_count()} threads"


if __name__ == "__main__":
    main()
