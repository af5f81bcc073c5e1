"""`selfhost chat` via the CLI: one-shot, --json, --schema, the REPL (CliRunner and a real pty), bad input.

Real llama.cpp where it matters: SmolLM2's answer and its token counts, the schema's grammar, Ctrl-C in
a real terminal. Elsewhere the CLI runs over the fake engine (the `fake_model` fixture,
tests/fakes/engine.py): the GGUF is still read, its template rendered, the history written for real."""

from __future__ import annotations

import io
import json
import re
import sqlite3
from pathlib import Path

import pytest

from selfhost import paths
from selfhost.cli.app import app
from tests.conftest import checkout_env, selfhost_command
from tests.fakes.tinygguf import write_tiny_llama

pytestmark = pytest.mark.needs_model  # every test runs llama.cpp on a tiny GGUF or SmolLM2
FAST = ["--threads", "1"]


def rows(sql: str) -> list[tuple]:
    with sqlite3.connect(paths.history_db()) as db:
        return db.execute(sql).fetchall()


def test_one_shot_json_answers_paris_and_is_logged(runner, smollm2_gguf: Path) -> None:
    result = runner.invoke(
        app,
        [
            "chat",
            str(smollm2_gguf),
            "-p",
            "What is the capital of France?",
            "--system",
            "Answer in one short sentence.",
            "-t",
            "0",
            "-n",
            "24",
            "--json",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    start_line, _, body = result.output.partition("\n")
    assert (
        "Q4_1 · context 8192" in start_line and "CPU · 0/" in start_line and "layers offloaded" in start_line
    )
    data = json.loads(body)
    assert json.loads(result.stdout) == data  # stdout holds nothing but the JSON
    assert "Paris" in data["reply"]
    usage = data["usage"]
    assert usage["prompt_tokens"] == usage["evaluated_tokens"] > 10 and usage["generated_tokens"] > 0
    assert usage["context_size"] == 8192  # the model's trained context, not llama-cpp-python's 512
    conv = data["conversation_id"]
    assert rows(
        f"SELECT role, content, tokens FROM messages WHERE conversation_id = {conv} ORDER BY seq"
    ) == [
        ("user", "What is the capital of France?", 7),
        ("assistant", data["reply"], usage["generated_tokens"]),
    ]
    assert rows(f"SELECT system, model FROM conversations WHERE id = {conv}") == [
        ("Answer in one short sentence.", smollm2_gguf.stem)
    ]


def test_piped_stdin_is_combined_with_the_prompt_and_continue_resumes(
    runner, tiny_gguf: Path, fake_model
) -> None:
    result = runner.invoke(
        app,
        ["chat", str(tiny_gguf), "-p", "summarise", "-n", "4", "--seed", "1", *FAST],
        input="line one\nline two\n",
    )
    assert result.exit_code == 0, result.output
    assert rows("SELECT content FROM messages WHERE role = 'user'") == [("line one\nline two\n\nsummarise",)]
    assert "<|im_start|>user\nline one\nline two\n\nsummarise<|im_end|>" in fake_model.prompts[-1]
    again = runner.invoke(
        app, ["chat", str(tiny_gguf), "--continue", "-p", "more", "-n", "4", "--json", *FAST]
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.partition("\n")[2])["usage"]["prompt_tokens"] > 20  # history was sent
    assert "summarise<|im_end|>\n<|im_start|>assistant\nReply 1 from the<|im_end|>" in fake_model.prompts[-1]
    assert rows("SELECT conversation_id, role FROM messages ORDER BY seq") == [
        (1, "user"),
        (1, "assistant"),
        (1, "user"),
        (1, "assistant"),
    ]
    nolog = runner.invoke(app, ["chat", str(tiny_gguf), "-p", "x", "-n", "2", "--no-log", *FAST])
    assert nolog.exit_code == 0 and rows("SELECT COUNT(*) FROM conversations") == [(1,)]


@pytest.mark.slow
def test_schema_constrains_and_validates_the_reply(runner, smollm2_gguf: Path, tmp_path: Path) -> None:
    schema = tmp_path / "capital.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                "required": ["country", "capital"],
            }
        )
    )
    result = runner.invoke(
        app,
        [
            "chat",
            str(smollm2_gguf),
            "-p",
            "What is the capital of France? Reply in JSON.",
            "--schema",
            str(schema),
            "-t",
            "0",
            "-n",
            "40",
            "--json",
            "--no-log",
            *FAST,
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.partition("\n")[2])
    assert data["schema_valid"] is True and set(data["data"]) == {"country", "capital"}
    assert "Paris" in data["data"]["capital"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"type": 12}', "is not a valid JSON schema"),
        ("[1]", "not a JSON schema"),
    ],
)
def test_invalid_schema_is_one_clear_line(runner, tiny_gguf: Path, tmp_path: Path, content, message) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = runner.invoke(app, ["chat", str(tiny_gguf), "-p", "hi", "--schema", str(bad)])
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1 and "Traceback" not in result.output


def test_no_template_needs_raw(runner, tmp_path: Path, fake_model) -> None:
    path = write_tiny_llama(tmp_path / "plain.gguf", chat_template=None)
    refused = runner.invoke(app, ["chat", str(path), "-p", "hello", *FAST])
    assert refused.exit_code == 2
    assert "has no chat template" in refused.output and "--raw" in refused.output
    raw = runner.invoke(
        app, ["chat", str(path), "--raw", "-p", "Once upon a time", "-n", "5", "--json", *FAST]
    )
    assert raw.exit_code == 0, raw.output
    assert "raw completion" in raw.output.partition("\n")[0]
    assert json.loads(raw.output.partition("\n")[2])["usage"]["generated_tokens"] == 5
    assert fake_model.prompts == ["Once upon a time"]  # no template: the text as it is


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "chat template failed"),  # the Jinja sandbox
        ("{% for m in messages %}", "chat template is invalid"),
    ],
)
def test_broken_chat_templates_are_one_line(
    runner, tmp_path: Path, template: str, message: str, fake_model
) -> None:
    path = write_tiny_llama(tmp_path / "broken.gguf", chat_template=template)
    result = runner.invoke(app, ["chat", str(path), "-p", "hello", *FAST])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert result.output.splitlines()[-1].startswith("error: ") and result.output.count("\n") <= 2


def test_bad_models_are_one_clear_line_before_llama_cpp(
    runner, tiny_gguf: Path, tmp_path: Path, fake_model
) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"this is not a model" * 100)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    cases = [
        (str(tmp_path / "missing.gguf"), "no such model file"),
        ("no-such-alias", "unknown model 'no-such-alias'"),
        (str(corrupt), "not a GGUF file"),
        (str(truncated), "truncated"),
    ]
    for ref, message in cases:
        result = runner.invoke(app, ["chat", ref, "-p", "hi", *FAST])
        assert result.exit_code == 1, (ref, result.output)
        assert result.output.startswith("error: ") and message in result.output, result.output
        assert result.output.count("\n") == 1
    assert fake_model.engines == []  # refused before anything was loaded


def test_corrupt_history_db_is_one_line_and_left_untouched(runner, tiny_gguf: Path, fake_model) -> None:
    db = paths.history_db()
    junk = b"definitely not sqlite " * 200
    db.write_bytes(junk)
    for args in (
        ["chat", str(tiny_gguf), "-p", "hi", *FAST],
        ["history", "list"],
        ["chat", "--continue", "-p", "x"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1
        assert "history database" in result.output and "corrupt" in result.output
        assert result.output.count("\n") == 1
    assert db.read_bytes() == junk
    ok = runner.invoke(app, ["chat", str(tiny_gguf), "-p", "hi", "-n", "2", "--no-log", *FAST])
    assert ok.exit_code == 0, ok.output


REPL_SCRIPT = (
    "\n".join(
        [
            "/stats",
            "hello there",
            "/frobnicate",
            '"""',
            "first line",
            "second line",
            '"""',
            "/history",
            "/undo",
            "/system Be terse.",
            "/stats",
            "/retry",
            "/save {out}/chat.md",
            "/save {out}/chat.json",
            "/reset",
            "/load {out}/chat.json",
            "again",
            "/help",
            "/exit",
            "never read",
        ]
    )
    + "\n"
)


def test_repl_scripted_transcript_and_sqlite_rows(
    runner, tiny_gguf: Path, tmp_path: Path, fake_model
) -> None:
    script = REPL_SCRIPT.format(out=tmp_path)
    result = runner.invoke(app, ["chat", str(tiny_gguf), "-n", "6", "--seed", "1", *FAST], input=script)
    out = result.output
    assert result.exit_code == 0, out
    assert "tiny · F32 · context 128" in out.splitlines()[0]
    assert "no reply yet" in out
    assert "error: unknown command /frobnicate (type /help for the list)" in out  # the one error line
    assert re.search(r"user \(\d+ tok\): first line\nsecond line\nassistant", out)  # one message
    assert "removed 2 message(s)" in out and "system prompt set" in out
    assert "prompt: " in out and "reused from the KV cache" in out
    assert "saved 2 message(s) to" in out and "new conversation" in out and "loaded 2 message(s)" in out
    assert "/retry" in out  # /help
    assert "never read" not in out
    # Transcript order: prompts, then replies, then the commands' lines.
    assert out.index("unknown command") < out.index("): first line") < out.index("removed 2")

    md = (tmp_path / "chat.md").read_text()
    assert "## System\n\nBe terse." in md and "## User\n\nhello there" in md
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]

    # SQLite: conversation 1 is "hello there" + the retried reply (the multi-line turn was undone);
    # conversation 2 is the loaded pair plus "again" and its reply.
    assert rows("SELECT id, system, title FROM conversations ORDER BY id") == [
        (1, "Be terse.", "hello there"),
        (2, "Be terse.", "hello there"),
    ]
    first = rows("SELECT role, content, seq FROM messages WHERE conversation_id = 1 ORDER BY seq")
    assert [(r[0], r[2]) for r in first] == [("user", 0), ("assistant", 1)]
    assert first[0][1] == "hello there" and first[1][1] == saved["messages"][1]["content"]
    second = rows("SELECT role, content FROM messages WHERE conversation_id = 2 ORDER BY seq")
    assert [r[0] for r in second] == ["user", "assistant", "user", "assistant"] and second[2][1] == "again"
    assert rows("SELECT COUNT(*) FROM messages WHERE content LIKE 'first line%'") == [(0,)]


def test_continue_restores_the_conversation(runner, tiny_gguf: Path, fake_model) -> None:
    runner.invoke(app, ["chat", str(tiny_gguf), "-n", "3", "-s", "sys!", *FAST], input="remember me\n/exit\n")
    result = runner.invoke(app, ["chat", str(tiny_gguf), "-c", "-n", "3", *FAST], input="/history\n")
    assert result.exit_code == 0, result.output
    assert "system: sys!" in result.output and "user (" in result.output and "remember me" in result.output
    other = runner.invoke(app, ["chat", str(tiny_gguf), "--conversation", "42", *FAST], input="")
    assert other.exit_code == 1 and "no conversation 42" in other.output


def test_real_terminal_ctrl_c_stops_the_reply_and_the_chat_survives(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    # Greedy on these random weights never emits <|im_end|>: a reply runs until stopped.
    model = write_tiny_llama(tmp_path / "talker.gguf", n_ctx=16384, n_embd=256, n_ff=512, n_head=4, seed=1)
    command = selfhost_command("chat", str(model), "-t", "0", "--threads", "1")
    env = checkout_env(TERM="dumb")
    child = pexpect.spawn(
        command[0],
        command[1:],
        env=env,
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 200),
    )
    transcript = io.StringIO()
    child.logfile_read = transcript
    try:
        child.expect_exact(">>> ")
        child.sendline("tell me a long story")
        child.expect_exact("tell me a long story")
        child.expect(r"\S{10}")  # the reply is streaming
        child.sendintr()
        child.expect_exact("[interrupted]")
        child.expect_exact(">>> ")
        child.sendline("/stats")
        child.expect(r"last reply: (\d+) tokens .*\(interrupted\)")
        generated = int(child.match.group(1))
        child.expect_exact(">>> ")
        child.sendintr()  # at the prompt: a hint, then a second Ctrl-C leaves
        child.expect_exact("Ctrl-C again")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, transcript.getvalue()[-2000:]
    assert 0 < generated < 16000
    kept = rows("SELECT role, finish_reason, tokens FROM messages ORDER BY seq")
    log = transcript.getvalue()[-3000:]
    assert [r[:2] for r in kept] == [("user", None), ("assistant", "interrupted")], log
    assert kept[1][2] == generated


def test_repl_retry_generates_a_new_reply_that_replaces_the_row(runner, tiny_gguf: Path, fake_model) -> None:
    fake_model.enqueue("The first answer, cut short by -n.", "A second answer.")
    script = "hello\n/retry\n/stats\n/exit\n"
    result = runner.invoke(app, ["chat", str(tiny_gguf), "-n", "6", *FAST], input=script)
    assert result.exit_code == 0, result.output
    replies = [part.split("\n")[0] for part in result.output.split(">>> ")[1:3]]
    assert replies == ["The first answer, cut short", "A second answer."], result.output
    assert "[reply stopped at --max-tokens]" in result.output.split(">>> ")[1]
    assert "session: 2 replies, 10 generated" in result.output  # 6 + 4: both replies are counted
    prompt = len(fake_model.engines[0].tokenize(fake_model.prompts[0], add_bos=False, special=True))
    assert f"prompt: {prompt} tokens, {prompt - 1} reused" in result.output  # the retry's prompt was cached
    assert fake_model.prompts[1] == fake_model.prompts[0]  # the same prompt, without the dropped reply
    stored = rows("SELECT role, content, tokens, finish_reason FROM messages ORDER BY seq")
    assert stored == [("user", "hello", 1, None), ("assistant", "A second answer.", 4, "stop")]


def test_continue_sends_the_earlier_turns_to_the_model(runner, tiny_gguf: Path, fake_model) -> None:
    first = runner.invoke(
        app, ["chat", str(tiny_gguf), "-p", "summarise this", "-n", "4", "--seed", "1", *FAST]
    )
    assert first.exit_code == 0, first.output
    fresh = runner.invoke(app, ["chat", str(tiny_gguf), "-p", "more", "-n", "4", "--json", "--no-log", *FAST])
    again = runner.invoke(app, ["chat", str(tiny_gguf), "-c", "-p", "more", "-n", "4", "--json", *FAST])
    assert fresh.exit_code == 0 and again.exit_code == 0, again.output
    fresh_prompt = json.loads(fresh.output.partition("\n")[2])["usage"]["prompt_tokens"]
    continued = json.loads(again.output.partition("\n")[2])["usage"]["prompt_tokens"]
    ((user, reply),) = rows("SELECT u.content, a.content FROM messages u JOIN messages a ON a.seq = 1 "
                          "WHERE u.seq = 0 AND u.conversation_id = 1 AND a.conversation_id = 1")  # fmt: skip
    earlier = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>\n"
    turn = "<|im_start|>user\nmore"
    assert fake_model.prompts[2] == fake_model.prompts[1].replace(turn, earlier + turn)  # the earlier turn
    count = len(fake_model.engines[0].tokenize(earlier, add_bos=False, special=True))
    assert count > 10 and continued == fresh_prompt + count


def test_schema_reply_that_does_not_match_exits_1_with_data_null(
    runner, tiny_gguf: Path, tmp_path: Path, fake_model
) -> None:
    schema = tmp_path / "s.json"
    schema.write_text(
        json.dumps({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]})
    )
    fake_model.default = lambda prompt, n: '{"a": "Paris"}'
    # 3 tokens cannot close the object (the fake ignores the grammar; a real model's reply would follow it)
    args = ["chat", str(tiny_gguf), "-p", "json please", "--schema", str(schema), "-n", "3", "--seed", "1"]
    result = runner.invoke(app, [*args, "--json", *FAST])
    assert result.exit_code == 1, result.output
    body = result.output.partition("\n")[2]
    payload = json.loads(body[: body.rindex("}") + 1])
    assert payload["schema_valid"] is False and payload["data"] is None
    assert payload["finish_reason"] == "length" and payload["reply"] == '{"a'
    assert result.output.splitlines()[-1].startswith("error: ") and "Traceback" not in result.output
    plain = runner.invoke(app, [*args, *FAST])
    assert plain.exit_code == 1 and plain.output.splitlines()[-1].startswith("error: ")


def test_trim_notice_and_the_system_prompt_survive_trimming_in_the_repl(
    runner, tmp_path: Path, fake_model
) -> None:
    model = write_tiny_llama(tmp_path / "ctx128.gguf", n_ctx=128)
    script = "".join(f"turn {i}: tell me more\n" for i in range(12)) + "/history\n/exit\n"
    args = ["chat", str(model), "-s", "Be brief.", "-n", "16", "--seed", "1", *FAST]
    result = runner.invoke(app, args, input=script)
    out = result.output
    assert result.exit_code == 0, out
    notices = re.findall(
        r"\[dropped the (\d+) oldest turn\(s\) to fit the context; (\d+) out of context", out
    )
    assert notices and int(notices[-1][1]) == sum(int(n) for n, _ in notices)
    assert "system: Be brief." in out and "out of context" in out.split("system: Be brief.")[1]
    texts = fake_model.prompts  # what reached the model
    engine = fake_model.engines[0]
    assert len(texts) == 12
    assert all(len(engine.tokenize(t, add_bos=False, special=True)) + 16 <= 128 for t in texts)  # + the reply
    assert all(
        t.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nturn ") for t in texts
    )
    assert "turn 0:" not in texts[-1] and "turn 11:" in texts[-1]
    assert rows("SELECT system FROM conversations") == [("Be brief.",)]
    assert rows("SELECT COUNT(*) FROM messages") == [(24,)]  # trimmed from the context, not from the log
