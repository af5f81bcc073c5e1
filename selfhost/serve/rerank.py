"""`POST /v1/rerank` (and `/rerank`): Jina/Cohere's rerank shape over a reranker GGUF (rank pooling).

Each document is scored against the query by the reranker loaded with `--rerank-model`; results are
sorted by `relevance_score` (the model's raw logit, as llama-server returns it), cut to `top_n`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from selfhost.errors import SelfhostError
from selfhost.runtime.embed import Embedder
from selfhost.serve.runner import Served
from selfhost.serve.schemas import MAX_TEXT, Lenient
from selfhost.serve.service import ApiError

Text = Annotated[str, Field(max_length=MAX_TEXT)]


class Document(Lenient):
    text: Text


class RerankRequest(Lenient):
    model: str | None = None
    query: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]
    documents: Annotated[list[Text | Document], Field(min_length=1, max_length=1024)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = False

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


def register(app: FastAPI, served: Served, reranker: Embedder | None) -> None:
    async def rerank(req: RerankRequest) -> dict[str, Any]:
        if reranker is None:
            raise ApiError(400, "this server has no reranker: start it with --rerank-model", param="model")
        return await run_in_threadpool(_rerank, reranker, req)

    for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"):  # llama-server's aliases
        app.add_api_route(path, rerank, methods=["POST"], dependencies=[served.auth])


def _rerank(reranker: Embedder, req: RerankRequest) -> dict[str, Any]:
    texts, results, total = req.texts(), [], 0
    for i, text in enumerate(texts):
        tokens = reranker.rerank_tokens(req.query, text)
        try:
            score = reranker.score(tokens)
        except SelfhostError as exc:
            raise ApiError(400, f"documents[{i}]: {exc}", param="documents") from exc
        total += len(tokens)
        result: dict[str, Any] = {"index": i, "relevance_score": score}
        if req.return_documents:
            result["document"] = {"text": text}
        results.append(result)
    results.sort(key=lambda r: r["relevance_score"], reverse=True)
    return {
        "model": reranker.name,
        "object": "list",
        "results": results[: req.top_n],
        "usage": {"prompt_tokens": total, "total_tokens": total},
    }
