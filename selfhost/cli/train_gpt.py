"""`selfhost train gpt | export | sample`: flags map onto TrainConfig / the core functions; Rich renders."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any

import typer

from selfhost.cli.console import console

_TRAIN_FLAGS = (
    "tokenizer", "vocab_size", "val_fraction", "n_layer", "n_head", "n_embd", "block_size", "dropout",
    "batch_size", "grad_accum", "max_iters", "learning_rate", "decay_lr", "warmup_iters", "lr_decay_iters",
    "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "eval_iters", "log_interval",
    "sample_tokens", "device", "dtype", "compile", "seed", "threads",
)  # fmt: skip


def register(app: typer.Typer, train: typer.Typer) -> None:
    train.command("gpt")(gpt)
    train.command("export")(export)
    train.command("sample")(sample)


def gpt(
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Text file, or folder of documents.")
    ] = None,
    preset: Annotated[str | None, typer.Option(help="seed | shakespeare-char | cpu-tiny (default).")] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="TOML file of settings (and `preset`).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Run and model name (default: <data>-gpt).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: SELFHOST_HOME/runs/<name>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in the run folder exactly.")
    ] = False,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print the cost estimate and exit.")] = False,
    export: Annotated[
        bool, typer.Option("--export/--no-export", help="Export to GGUF + store at the end.")
    ] = True,
    export_type: Annotated[str, typer.Option("--export-type", help="f16 or f32.")] = "f16",
    tokenizer: Annotated[str | None, typer.Option(help="char or bpe.")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="BPE vocabulary size.")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Share of tokens held out for validation.")
    ] = None,
    n_layer: Annotated[int | None, typer.Option(help="Transformer blocks.")] = None,
    n_head: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    n_embd: Annotated[int | None, typer.Option(help="Embedding width (a multiple of 32 for Q8_0).")] = None,
    block_size: Annotated[int | None, typer.Option(help="Context length in tokens.")] = None,
    dropout: Annotated[float | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per micro-batch (per process).")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step.")] = None,
    max_iters: Annotated[int | None, typer.Option("--iters", help="Optimizer steps.")] = None,
    learning_rate: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    decay_lr: Annotated[
        bool | None, typer.Option("--decay-lr/--constant-lr", help="Cosine decay or constant.")
    ] = None,
    warmup_iters: Annotated[int | None, typer.Option("--warmup", help="Linear warm-up steps.")] = None,
    lr_decay_iters: Annotated[
        int | None, typer.Option(help="Steps of cosine decay (default: --iters).")
    ] = None,
    min_lr: Annotated[float | None, typer.Option(help="Learning rate at the end of the decay.")] = None,
    weight_decay: Annotated[float | None, typer.Option()] = None,
    beta1: Annotated[float | None, typer.Option()] = None,
    beta2: Annotated[float | None, typer.Option()] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm (0: off).")] = None,
    eval_interval: Annotated[int | None, typer.Option(help="Steps between evals + checkpoints.")] = None,
    eval_iters: Annotated[int | None, typer.Option(help="Batches per eval.")] = None,
    log_interval: Annotated[int | None, typer.Option(help="Steps between progress updates.")] = None,
    sample_tokens: Annotated[int | None, typer.Option(help="Tokens of sample text at each eval.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads per process (0: the cores other programs leave free).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, bfloat16 or float16.")] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    tensorboard: Annotated[
        bool, typer.Option("--tensorboard", help="Also write TensorBoard event files (run/tensorboard).")
    ] = False,
) -> None:
    """Train a GPT (GPT-2 architecture) on your text; torchrun runs it on several GPUs/processes.

    Metrics go to <run>/metrics.jsonl as training goes; `selfhost train runs` shows them."""
    from selfhost import paths
    from selfhost.train.gpt import require_torch
    from selfhost.train.gpt.config import build_config, check_name

    require_torch()
    from selfhost.train.gpt import trainer

    given = locals()
    overrides = {k: given[k] for k in _TRAIN_FLAGS if given[k] is not None}
    cfg = build_config(preset, config, overrides)
    if name is None:
        name = (out.name if out else f"{data.stem}-gpt" if data else "my-gpt").lower()
    check_name(name)
    run_dir = out or paths.runs_dir() / name
    req = trainer.TrainRequest(config=cfg, run_dir=run_dir, data=data, resume=resume, overrides=overrides)
    if estimate:
        _print_estimate(trainer.estimate_run(req), cfg, None)
        return
    from selfhost.cli.train_runs import print_curves
    from selfhost.train import runs

    done = _render(runs.record(trainer.train(req), tensorboard=tensorboard, data=data))
    if done is not None:
        print_curves(run_dir)
    if done is not None and export and trainer.dist_from_env().is_master:
        if done.best is not None and done.best_val_loss is not None and done.best_val_loss < done.val_loss:
            console.print(f"exporting the best weights: val loss {done.best_val_loss:.4f}", markup=False)
        _export(done.best or done.checkpoint, name, export_type)


def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="Run folder (its best.pt, else ckpt.pt), a .pt file or a run name.")
    ],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="Store name (default: the run's name).")
    ] = None,
    export_type: Annotated[str, typer.Option("--type", "-t", help="f16 or f32.")] = "f16",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="GGUF path (default: models folder).")
    ] = None,
    register: Annotated[
        bool, typer.Option("--register/--no-register", help="Add it to the local store.")
    ] = True,
) -> None:
    """Write a checkpoint as a GGUF (llama.cpp `gpt2`) and register it in the store."""
    from selfhost.train.gpt import require_torch

    require_torch()
    ckpt = _find_checkpoint(checkpoint)
    run = ckpt if ckpt.is_dir() else ckpt.parent
    _export(ckpt, name or run.name.lower(), export_type, output, register)


def sample(
    checkpoint: Annotated[
        Path, typer.Argument(help="Run folder (its best.pt, else ckpt.pt), a .pt file or a run name.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-m")] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k")] = 200,
    seed: Annotated[int | None, typer.Option()] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Generate text from a PyTorch checkpoint."""
    from selfhost.train.gpt import require_torch

    require_torch()
    from selfhost.train.gpt.sample import generate

    def warn(unseen: Any) -> None:
        console.print(f"note: {unseen.describe('the prompt')}", markup=False, highlight=False)

    pieces = generate(_find_checkpoint(checkpoint), prompt, max_tokens=max_tokens, temperature=temperature,
                      top_k=top_k, seed=seed, device=device, on_unseen=warn)  # fmt: skip
    first = next(pieces, None)  # loads the model (and reports unseen characters) before the prompt is shown
    console.print(prompt, end="", markup=False, highlight=False)
    for piece in itertools.chain([first] if first is not None else [], pieces):
        console.print(piece, end="", markup=False, highlight=False)
    console.print()


# -- helpers ------------------------------------------------------------------------------------
def _find_checkpoint(ref: Path) -> Path:
    from selfhost import paths

    if not ref.exists() and len(ref.parts) == 1 and (paths.runs_dir() / ref.name).exists():
        return paths.runs_dir() / ref.name
    return ref


def _export(
    ckpt: Path, name: str, export_type: str, output: Path | None = None, register: bool = True
) -> None:
    from selfhost.atomic import human_bytes
    from selfhost.train.gpt.export import export_checkpoint

    kind = export_type.lower()
    path, record = export_checkpoint(ckpt, name, dtype=kind, dest=output, register=register)  # type: ignore[arg-type]
    from selfhost.train.runs import note_export

    note_export(ckpt if ckpt.is_dir() else ckpt.parent, record.name if record else None, path)
    size = human_bytes(path.stat().st_size)
    console.print(f"exported {path} ({size}, {kind.upper()})", markup=False)
    if record is not None:
        hint = f'selfhost chat {record.name} --raw -p "..."'
        console.print(f"registered as '{record.name}': {hint}", markup=False)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    return f"{d}d {h}h" if d else f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


def _print_estimate(est: Any, cfg: Any, start: Any | None) -> None:
    arch = f"{cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}d, block {cfg.block_size}"
    console.print(
        f"model    {_fmt_count(est.n_params)} params ({arch}), {_fmt_count(est.flops_per_token)} FLOPs/token",
        markup=False,
    )
    console.print(
        f"run      {est.tokens_per_iter:,} tokens/iter x {est.iters:,} iters = "
        f"{_fmt_count(est.total_tokens)} "
        f"tokens ({est.epochs:.1f} epochs of {_fmt_count(est.train_tokens)} train tokens), "
        f"{est.total_flops:.2e} FLOPs",
        markup=False,
    )
    enough = "enough" if est.train_tokens >= est.compute_optimal_tokens else "less"
    console.print(
        f"data     compute-optimal ~{_fmt_count(est.compute_optimal_tokens)} tokens (20/param); "
        f"you give {_fmt_count(est.train_tokens)} ({enough})",
        markup=False,
    )
    rate = f"{est.tokens_per_s:,.0f} tokens/s measured" if est.tokens_per_s else "not measured"
    console.print(f"speed    {est.device}: {rate} -> ETA {_fmt_time(est.eta_s)}", markup=False)


def _render(events: Any) -> Any:
    """Print the start line, a progress bar with loss/tok/s/MFU/ETA, and each eval with its sample."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from selfhost.train.gpt import trainer

    done = None
    progress = Progress(TextColumn("[bold]train[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), console=console, transient=False)  # fmt: skip
    task = None
    with progress:
        for ev in events:
            if isinstance(ev, trainer.RunStart):
                verb = f"resuming at step {ev.start_iter}" if ev.start_iter else "training"
                progress.console.print(
                    f"{verb} in {ev.run_dir} on {ev.device} ({ev.dtype}, {ev.world_size} process"
                    f"{'es' if ev.world_size > 1 else ''}); data {_fmt_count(ev.n_tokens)} tokens, "
                    f"{ev.tokenizer} vocabulary {ev.vocab_size:,}"
                    + (f", {ev.threads} CPU thread{'s' if ev.threads != 1 else ''}" if ev.threads else ""),
                    markup=False,
                )
                if ev.unseen is not None and ev.unseen.total:
                    progress.console.print(f"note: {ev.unseen.describe('the data')}", markup=False)
                _print_estimate(ev.estimate, ev.config, ev)
                task = progress.add_task("train", total=ev.config.max_iters, completed=ev.start_iter, info="")
            elif isinstance(ev, trainer.StepEvent) and task is not None:
                mfu = f" | MFU {ev.mfu * 100:.1f}%" if ev.mfu is not None else ""
                info = (f"loss {ev.loss:.4f} | lr {ev.lr:.2e} | {ev.tokens_per_s:,.0f} tok/s{mfu} "
                        f"| ETA {_fmt_time(ev.eta_s)}")  # fmt: skip
                progress.update(task, completed=ev.step, info=info)
            elif isinstance(ev, trainer.EvalEvent):
                saved = f" -> {ev.checkpoint}" if ev.checkpoint else ""
                progress.console.print(
                    f"step {ev.step}: train loss {ev.train_loss:.4f}, val loss {ev.val_loss:.4f}{saved}",
                    markup=False,
                )
                if ev.sample:
                    progress.console.print(ev.sample.rstrip() + "\n---", markup=False, style="dim")
            elif isinstance(ev, trainer.Interrupted):
                progress.console.print(
                    f"stopped at step {ev.step}; checkpoint {ev.checkpoint} (continue with --resume)",
                    markup=False,
                )
            elif isinstance(ev, trainer.Done):
                done = ev
                progress.console.print(
                    f"done: {ev.step} steps in {_fmt_time(ev.elapsed_s)}, val loss {ev.val_loss:.4f}",
                    markup=False,
                )
    return done
