-- A history.db as written by selfhost 0.1 (schema version 1), frozen: tests/data/history_v1.db is
-- built from this file with `sqlite3 tests/data/history_v1.db < tests/data/history_v1.sql`
-- (or tests/chat/test_history.py::build_v1_fixture); never from today's migration code.
CREATE TABLE _migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at TEXT);
CREATE TABLE conversations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    title TEXT NOT NULL DEFAULT '',
    model TEXT,
    system TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content TEXT NOT NULL,
    tokens INTEGER,
    created_at TEXT NOT NULL,
    model TEXT
);
CREATE INDEX messages_by_conversation ON messages(conversation_id, seq);
INSERT INTO _migrations VALUES (1, 'm1_initial', '2025-06-01T10:00:00+00:00');
INSERT INTO conversations (title, model, system, created_at, updated_at) VALUES
    ('capital of France', 'smollm2-135m:Q4_1', 'Answer briefly.',
     '2025-06-01T10:00:00+00:00', '2025-06-01T10:00:05+00:00'),
    ('a haiku', 'qwen2.5-0.5b:Q4_K_M', NULL, '2025-06-02T09:00:00+00:00', '2025-06-02T09:01:00+00:00');
INSERT INTO messages (conversation_id, seq, role, content, tokens, created_at, model) VALUES
    (1, 0, 'user', 'What is the capital of France?', 7, '2025-06-01T10:00:00+00:00', NULL),
    (1, 1, 'assistant', 'Paris.', 3, '2025-06-01T10:00:05+00:00', 'smollm2-135m:Q4_1'),
    (2, 0, 'user', 'Write a haiku about rain.', 8, '2025-06-02T09:00:00+00:00', NULL),
    (2, 1, 'assistant', 'Soft rain on the roof', 6, '2025-06-02T09:01:00+00:00', 'qwen2.5-0.5b:Q4_K_M');
