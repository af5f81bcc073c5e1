"""ChatModel: one loaded GGUF, ready to chat: its template, its tokenizer, its batch engine.

`ChatModel.load()` is the one way every chat surface (REPL, one-shot, server) gets a model: given a
resolved model (or a path), it validates the GGUF before llama.cpp sees it, sizes the context from memory,
loads the weights with explicit settings and reports what llama.cpp did (backend, layers offloaded).
`open_engine()` is the one place it meets llama.cpp: a test may stand a fake engine in its place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from selfhost.chat.families import Family, detect_family
from selfhost.errors import UsageError
from selfhost.runtime.batch import BatchEngine
from selfhost.runtime.defaults import DEFAULT_PREFILL_CHUNK
from selfhost.runtime.gguf_info import GGUFInfo
from selfhost.runtime.kvcache import KVSettings
from selfhost.runtime.speculative import SpecSettings
from selfhost.runtime.template import ChatTemplate

if TYPE_CHECKING:
    from selfhost.models.resolve import ResolvedModel  # the type only: loaders never resolve names
    from selfhost.runtime.llama_backend import LoadReport

LOADER_CONTEXT = 64  # llama-cpp-python's own context is unused: generation runs in the batch engine


class EngineOptions(BaseModel):
    """How the batch engine runs: KV-cache types, speculative decoding, the prompt cache."""

    kv: KVSettings = KVSettings()
    spec: SpecSettings = SpecSettings()
    draft_model: Any = None  # a ResolvedModel (the caller resolved its name) or a GGUF path; spec "draft"
    cache_ram_mb: int = 0  # prompt cache in host RAM (0: none, unless cache_dir is set)
    cache_dir: Path | None = None  # prompt cache kept on disk across restarts


class ModelSummary(BaseModel):
    """What was loaded and how: the start-up line."""

    name: str
    path: Path
    quant: str
    n_ctx: int  # tokens per slot
    n_ctx_train: int | None
    backend: str
    layers_offloaded: int
    n_layers: int
    threads: int
    raw: bool
    slots: int = 1
    extras: list[str] = []  # KV types, speculation, prompt cache: shown when not the defaults

    def line(self) -> str:
        trained = f" (trained {self.n_ctx_train})" if self.n_ctx_train else ""
        mode = " · raw completion" if self.raw else ""
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "")
        context = f"context {self.n_ctx}" + (" per slot" if self.slots > 1 else "")
        slots = f" · {self.slots} slots" if self.slots > 1 else ""
        return (
            f"{self.name} · {self.quant} · {context}{trained}{slots} · {self.backend} · "
            f"{self.layers_offloaded}/{self.n_layers} layers offloaded · {threads}{mode}"
            + "".join(f" · {e}" for e in self.extras)
        )


class ChatModel:
    """A loaded model: render messages with its template, tokenize and generate through `engine`.

    Everything it knows of tokens and generation comes from the engine (its `tokenize`, `special_text`,
    `adds_bos`, `submit`): `open_engine` below is the one place a chat model meets llama.cpp."""

    def __init__(self, info: GGUFInfo, summary: ModelSummary, engine: BatchEngine) -> None:
        self.info = info
        self.summary = summary
        self.engine = engine
        self.llm = engine.llm  # the loaded weights: a chat model's embeddings use them too
        self.template = self._make_template() if info.chat_template else None
        # how replies carry reasoning and tool calls: detected once, from the template itself
        self.family: Family = detect_family(info.chat_template if self.template else None, info.architecture)

    @classmethod
    def load(
        cls,
        ref: ResolvedModel | Path,
        *,
        ctx: int | None = None,
        threads: int | None = None,
        gpu_layers: int | None = None,
        raw: bool = False,
        parallel: int | None = 1,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        max_queue: int | None = None,
        options: EngineOptions | None = None,
    ) -> ChatModel:
        """Validate and load a resolved model (or a GGUF path). Raises GGUFError/UsageError/ModelLoadError.

        The caller resolved the name, once; parallel=None sizes the slots from free memory."""
        from selfhost.runtime import gguf_info
        from selfhost.runtime.memory import default_context, default_slots

        name, path = (ref.stem, ref) if isinstance(ref, Path) else (ref.name, ref.path)
        info = gguf_info.inspect(path)  # before llama.cpp ever touches the file
        if not raw and not info.chat_template:
            raise UsageError(
                f"{name} has no chat template in its GGUF, so selfhost cannot format a chat for it",
                hint="use --raw for plain text completion",
            )
        if info.chat_template:
            ChatTemplate(info.chat_template)  # a broken template stops us before the weights load
        if ctx is not None and ctx < 16:
            raise UsageError(f"--ctx {ctx} is too small", hint="use at least 16 tokens")
        options = _checked(options or EngineOptions())
        if parallel is None:
            parallel = default_slots(info, kv=options.kv)
        elif parallel < 1:
            raise UsageError(f"--parallel {parallel} must be at least 1")
        n_ctx = ctx or default_context(info, slots=parallel, kv=options.kv)
        engine, report = open_engine(
            Path(path), info, slots=parallel, ctx_per_slot=n_ctx, gpu_layers=gpu_layers, threads=threads,
            prefill_chunk=prefill_chunk, max_queue=max_queue, options=options,
        )  # fmt: skip
        summary = ModelSummary(
            name=name,
            path=path,
            quant=info.quant,
            n_ctx=n_ctx,
            n_ctx_train=report.n_ctx_train or info.context_length,
            backend=report.backend,
            layers_offloaded=report.layers_offloaded,
            n_layers=report.n_layers or (info.n_layers or 0),
            threads=report.n_threads,
            raw=raw,
            slots=parallel,
            extras=_extras(options),
        )
        return cls(info, summary, engine)

    def close(self) -> None:
        self.engine.stop()
        if self.engine.draft_llm is not None:
            self.engine.draft_llm.close()
            self.engine.draft_llm = None

    def _make_template(self) -> ChatTemplate:
        return ChatTemplate(
            self.info.chat_template or "",
            eos_token=self.engine.special_text("eos"),
            bos_token=self.engine.special_text("bos"),
        )

    @property
    def n_ctx(self) -> int:
        return self.summary.n_ctx

    # ------------------------------------------------------------- the prompt
    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        raw: bool = False,
        tools: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """Prompt text: the chat template over role/content dicts, or their plain concatenation (raw).
        `extra`: template variables (the family's think switch)."""
        if raw or self.template is None:
            system = [m["content"] for m in messages if m["role"] == "system"]
            head = f"{system[0]}\n\n" if system else ""
            return head + "".join(m["content"] or "" for m in messages if m["role"] != "system")
        return self.template.render(messages, tools=tools, extra=extra)

    def tokenize_prompt(self, text: str, *, raw: bool = False) -> list[int]:
        """Tokens of a rendered prompt. A chat template writes BOS itself; raw text gets the model's BOS."""
        if raw or self.template is None:
            return self.engine.tokenize(text, add_bos=self.engine.adds_bos, special=False)
        return self.engine.tokenize(text, add_bos=False, special=True)

    def count_tokens(self, text: str) -> int:
        return len(self.engine.tokenize(text, add_bos=False, special=False))


def open_engine(
    path: Path,
    info: GGUFInfo,
    *,
    slots: int,
    ctx_per_slot: int,
    gpu_layers: int | None,
    threads: int | None,
    prefill_chunk: int,
    max_queue: int | None,
    options: EngineOptions,
) -> tuple[BatchEngine, LoadReport]:
    """Load a validated GGUF with llama.cpp (and the draft model, when there is one) and open the batch
    engine over it: the one place ChatModel meets llama.cpp. Returns the engine and what the load did.
    gpu_layers=None: every layer on the GPU when this build can offload."""
    from selfhost.runtime.llama_backend import default_gpu_layers, load_model

    if gpu_layers is None:
        gpu_layers = default_gpu_layers()
    llm, report = load_model(
        path, n_ctx=LOADER_CONTEXT, n_gpu_layers=gpu_layers, n_threads=threads, info=info
    )
    draft_llm = None
    try:
        if options.draft_model is not None:
            draft_llm = _load_draft(llm, options.draft_model, gpu_layers, threads)
        engine = BatchEngine(
            llm,
            slots=slots,
            ctx_per_slot=ctx_per_slot,
            threads=report.n_threads,
            prefill_chunk=prefill_chunk,
            max_queue=max_queue,
            kv=options.kv,
            spec=options.spec,
            draft_llm=draft_llm,
            prompt_cache=_prompt_cache(options, path),
        )
    except BaseException:
        for loaded in (draft_llm, llm):
            if loaded is not None:
                loaded.close()
        raise
    return engine, report


def _checked(options: EngineOptions) -> EngineOptions:
    """Refuse impossible settings before any weights load."""
    options.kv.check()
    spec = options.spec
    if options.draft_model is not None:
        if spec.mode == "ngram":
            raise UsageError("use either --spec ngram or --draft-model, not both")
        options = options.model_copy(update={"spec": spec.model_copy(update={"mode": "draft"})})
    elif spec.mode == "draft":
        raise UsageError("speculation with a draft model needs --draft-model NAME")
    if options.spec.mode != "none" and not 1 <= options.spec.draft_max <= 64:
        raise UsageError(f"--spec-draft {options.spec.draft_max} must be between 1 and 64")
    if options.spec.mode == "ngram" and not 1 <= options.spec.ngram <= 16:
        raise UsageError(f"--spec-ngram {options.spec.ngram} must be between 1 and 16")
    if options.cache_ram_mb < 0:
        raise UsageError("--cache-ram must be 0 or more megabytes")
    return options


def _load_draft(llm: Any, name: Any, gpu_layers: int, threads: int | None) -> Any:
    """Load the draft model (resolved by the caller, or a path); refuse it when its vocabulary is not the
    target's."""
    from selfhost.runtime import gguf_info, llama_private
    from selfhost.runtime.llama_backend import llama, load_model
    from selfhost.runtime.speculative import check_compatible

    path, label = (name.path, name.name) if hasattr(name, "path") else (Path(name), Path(name).name)
    info = gguf_info.inspect(path)
    draft, _ = load_model(path, n_ctx=LOADER_CONTEXT, n_gpu_layers=gpu_layers, n_threads=threads, info=info)
    try:
        check_compatible(llama(), llama_private.vocab(llm), llama_private.vocab(draft), label)
    except BaseException:
        draft.close()
        raise
    return draft


def _prompt_cache(options: EngineOptions, model_path: Path) -> Any:
    """The prompt cache the options ask for (None: no --cache-ram and no --cache-dir)."""
    if options.cache_ram_mb <= 0 and options.cache_dir is None:
        return None
    from selfhost.runtime.llama_backend import llama
    from selfhost.runtime.prompt_cache import PromptCache, model_identity

    kv = options.kv
    extra = f"{kv.type_k}/{kv.type_v}/{getattr(llama(), '__version__', '')}"
    ram = (options.cache_ram_mb or 1024) * 2**20
    return PromptCache(ram, options.cache_dir, model_identity(Path(model_path), extra))


def _extras(options: EngineOptions) -> list[str]:
    out = [x for x in (options.kv.label(), options.spec.label()) if x]
    if options.cache_ram_mb > 0 or options.cache_dir is not None:
        out.append("prompt cache" + (f" {options.cache_ram_mb} MB" if options.cache_ram_mb else ""))
    return out
