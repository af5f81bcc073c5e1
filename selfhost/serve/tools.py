"""llama-server's helper endpoints: `/tokenize`, `/detokenize` and `/apply-template`, same shapes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from selfhost.serve import runner
from selfhost.serve.runner import Served
from selfhost.serve.schemas import MAX_TEXT, ChatCompletionRequest, Lenient
from selfhost.serve.service import ApiError


class TokenizeRequest(Lenient):
    model: str | None = None  # the server's default model when none is named
    content: Annotated[str, Field(max_length=MAX_TEXT)]
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(Lenient):
    model: str | None = None
    tokens: Annotated[list[int], Field(max_length=1_000_000)]


def register(app: FastAPI, served: Served) -> None:
    @app.post("/tokenize", dependencies=[served.auth])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        async with runner.chat_model(served, req.model) as model:
            data = req.content.encode("utf-8")
            ids = model.llm.tokenize(data, add_bos=req.add_special, special=req.parse_special)
            if not req.with_pieces:
                return {"tokens": ids}
            return {"tokens": [{"id": i, "piece": _piece(model, i)} for i in ids]}

    @app.post("/detokenize", dependencies=[served.auth])
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        async with runner.chat_model(served, req.model) as model:
            n_vocab = model.lib.llama_vocab_n_tokens(model.vocab)
            bad = next((t for t in req.tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                message = f"tokens: {bad} is not a token id of this model (0..{n_vocab - 1})"
                raise ApiError(400, message, param="tokens")
            return {"content": model.llm.detokenize(req.tokens).decode("utf-8", errors="replace")}

    @app.post("/apply-template", dependencies=[served.auth])
    async def apply_template(req: ChatCompletionRequest) -> dict[str, str]:
        reply = await runner.plan(served, req)
        runner.discard(reply)
        session, tools = reply.planned.session, reply.planned.tools.template_tools
        return {"prompt": await run_in_threadpool(session.render, session.messages, tools)}


def _piece(model: Any, token: int) -> str | list[int]:
    """A token's text, or its bytes when they are not valid UTF-8 on their own (as llama-server)."""
    from selfhost.runtime.text_stream import token_piece

    data = token_piece(model.lib, model.vocab, token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)
