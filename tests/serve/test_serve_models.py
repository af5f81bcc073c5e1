"""`selfhost serve` serving every local model on demand: real uvicorn, real llama.cpp, the openai client.

The store holds SmolLM2 ("smol"), two tiny random GGUFs ("tiny", "tiny-b": greedy answers unlike
SmolLM2's), a truncated GGUF ("broken") and a tiny GGUF registered as the registry's embedding model.
(The --max-models budget, which llama.cpp has no part in: tests/serve/test_serve_fake_engine.py.)
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import checkout_env, selfhost_command
from tests.fakes.servehelp import Server

pytestmark = pytest.mark.slow

EMBED_ALIAS, EMBED_QUANT = "nomic-embed-text-v1.5", "Q8_0"
EMBED_REPO = "nomic-ai/nomic-embed-text-v1.5-GGUF"
HI = [{"role": "system", "content": "Answer in one short sentence."},
      {"role": "user", "content": "What is the capital of France?"}]


def _register(name: str, path: Path, repo: str | None = None) -> None:
    from selfhost.models.store import ModelRecord, Store

    Store().add(ModelRecord(name=name, path=path, size=path.stat().st_size, sha256=None, source="local",
                            repo=repo))  # fmt: skip


def _home(root: Path, smollm2_gguf: Path) -> Path:
    """A SELFHOST_HOME whose store holds the models above, and per-model settings in models.toml."""
    from tests.fakes.tinygguf import write_tiny_llama

    home = root / "home"
    home.mkdir(parents=True)
    tiny = write_tiny_llama(root / "tiny.gguf", seed=1)
    tiny_b = write_tiny_llama(root / "tiny-b.gguf", seed=2)
    broken = root / "broken.gguf"
    broken.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFHOST_HOME", str(home))
        for name, path in (("smol", smollm2_gguf), ("tiny", tiny), ("tiny-b", tiny_b), ("broken", broken)):
            _register(name, path)
        _register(f"{EMBED_ALIAS}:{EMBED_QUANT}", tiny, EMBED_REPO)
    (home / "models.toml").write_text('[serve.models."tiny"]\nparallel = 3\nctx = 128\n')
    return home


@pytest.fixture(scope="module")
def multi(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    home = _home(tmp_path_factory.mktemp("multi"), smollm2_gguf)
    with Server(None, home, "--threads", "2", "--parallel", "2", "--ctx", "512") as srv:
        srv.smollm2 = smollm2_gguf
        yield srv


@pytest.fixture(scope="module")
def client(multi: Server):
    return openai.OpenAI(base_url=f"{multi.url}/v1", api_key="none", max_retries=0, timeout=120)


def status(srv: Server) -> dict:
    return httpx.get(f"{srv.url}/v1/status", headers=srv.headers(), timeout=10).json()


def loaded(srv: Server) -> set[str]:
    return {m["name"] for m in status(srv)["models"]}


def ask(client, model: str, **extra) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=HI, temperature=0, max_tokens=16, **extra)


def test_each_request_is_answered_by_the_model_it_names(multi: Server, client) -> None:
    assert loaded(multi) == set()  # nothing preloaded: every model loads on first use
    smol, tiny = ask(client, "smol"), ask(client, "tiny")
    assert smol.model == "smol" and tiny.model == "tiny"
    assert "Paris" in smol.choices[0].message.content
    assert smol.choices[0].message.content != tiny.choices[0].message.content
    assert ask(client, "smol").choices[0].message.content == smol.choices[0].message.content
    models = {m["id"]: m for m in httpx.get(f"{multi.url}/v1/models").json()["data"]}
    assert {"smol", "tiny", "tiny-b", "broken", f"{EMBED_ALIAS}:{EMBED_QUANT}"} <= set(models)
    assert models["smol"]["loaded"] and models["tiny"]["loaded"] and not models["tiny-b"]["loaded"]
    assert models["smol"]["kind"] == "chat" and models["tiny-b"]["kind"] == "chat"
    assert models["tiny-b"]["context_length"] == 128 and models["tiny-b"]["size"] > 0
    assert models["smol"]["size"] == multi.smollm2.stat().st_size and models["smol"]["context_length"] == 512
    # per-model settings from $SELFHOST_HOME/models.toml: tiny has 3 slots of 128 tokens, smol the flags'
    by_name = {m["name"]: m for m in status(multi)["models"]}
    assert (by_name["tiny"]["slots"], by_name["tiny"]["context"]) == (3, 128)
    assert (by_name["smol"]["slots"], by_name["smol"]["context"]) == (2, 512)


def test_unknown_and_not_downloaded_names_are_404_model_not_found(client) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        ask(client, "no-such-model")
    assert unknown.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client, "qwen3-0.6b")
    assert missing.value.body["code"] == "model_not_found"
    assert "selfhost pull qwen3-0.6b" in missing.value.body["message"]


def test_embedding_model_refuses_chat_with_400_and_embeds(multi: Server, client) -> None:
    name = f"{EMBED_ALIAS}:{EMBED_QUANT}"
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, EMBED_ALIAS)
    assert "embedding" in refused.value.body["message"] and refused.value.body["param"] == "model"
    vectors = client.embeddings.create(model=EMBED_ALIAS, input=["one", "two"])
    assert vectors.model == name and len(vectors.data) == 2 and len(vectors.data[0].embedding) == 64
    kinds = {m["name"]: m["kind"] for m in status(multi)["models"]}
    assert kinds[name] == "embedding"


def test_eight_concurrent_first_requests_cause_one_load(multi: Server, client) -> None:
    assert "tiny-b" not in loaded(multi)
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: ask(client, "tiny-b"), range(8)))
    assert {r.model for r in replies} == {"tiny-b"}
    assert len({r.choices[0].message.content for r in replies}) == 1  # greedy: the same reply
    assert status(multi)["loads"]["tiny-b"] == 1


def test_a_model_that_fails_to_load_is_an_error_and_the_server_answers_next(multi: Server, client) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        ask(client, "broken")
    assert failed.value.body["code"] == "model_load_failed" and "broken" in failed.value.body["message"]
    assert "broken" in status(multi)["failures"]
    assert ask(client, "tiny").model == "tiny"  # the server is up, the loaded models still answer


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _ps(srv: Server, *args: str) -> subprocess.CompletedProcess:
    port = str(srv.url.rsplit(":", 1)[1])
    env = checkout_env(SELFHOST_HOME=str(srv.home))
    command = selfhost_command("ps", "--port", port, *args)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_keep_alive_0_unloads_after_the_reply_and_ps_shows_it_gone(multi: Server, client) -> None:
    ask(client, "smol")
    before = _rss(multi.proc.pid)
    shown = json.loads(_ps(multi, "--json").stdout)
    smol = next(m for m in shown["models"] if m["name"] == "smol")
    assert smol["memory"] > smol["size"] > 50_000_000 and smol["backend"] == "CPU"
    assert smol["expires_at"] > time.time() + 200  # the server's default keep-alive: 5 minutes
    table = _ps(multi)
    assert table.returncode == 0 and "smol" in table.stdout and "in 4m" in table.stdout, table.stdout
    reply = ask(client, "smol", extra_body={"keep_alive": 0})
    assert reply.model == "smol"
    deadline = time.monotonic() + 20
    while "smol" in loaded(multi) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "smol" not in {m["name"] for m in json.loads(_ps(multi, "--json").stdout)["models"]}
    assert before - _rss(multi.proc.pid) > 40_000_000, (before, _rss(multi.proc.pid))
    with pytest.raises(openai.BadRequestError):
        ask(client, "tiny", extra_body={"keep_alive": "soon"})


def test_ps_names_the_fix_when_no_server_listens(tmp_path: Path) -> None:
    env = checkout_env(SELFHOST_HOME=str(tmp_path))
    done = subprocess.run(selfhost_command("ps", "--port", "9"), capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "no selfhost server at 127.0.0.1:9" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_file_sets_per_model_slots_and_bad_entries_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "serve.toml"
    bad.write_text('[serve.models."smol"]\nparallel = 0\n')
    env = checkout_env(SELFHOST_HOME=str(tmp_path / "home"))
    done = subprocess.run(selfhost_command("serve", "--config", str(bad), "--port", "0"), capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "parallel" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.needs_model
def test_pull_on_the_server_fetches_a_requested_model(tiny_hub, isolated_home: Path) -> None:  # noqa: F811
    """`serve --pull`: a request for an alias not downloaded pulls it (progress in the log), then answers."""
    with Server(None, isolated_home, "--threads", "1", "--pull") as srv:
        reply = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": HI, "max_tokens": 4, "temperature": 0}).json()  # fmt: skip
        assert reply["model"] == "tiny:F16", reply
        assert "pulling tiny" in srv.output() and "pulled tiny:F16" in srv.output()
        failed = httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
            "model": "ghost", "messages": HI, "max_tokens": 4}).json()  # fmt: skip
        assert failed["error"]["code"] == "pull_failed", failed
        assert ask_tiny_again(srv)["model"] == "tiny:F16"  # pulled once: now in the store


def ask_tiny_again(srv: Server) -> dict:
    return httpx.post(f"{srv.url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": HI, "max_tokens": 2, "temperature": 0}).json()  # fmt: skip
