"""Named, append-only schema migrations.

Never edit a migration that has shipped: add a new one at the end. `Store`
records each applied name in `schema_migrations` and skips it on reopen.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    (
        "001_core",
        """
        CREATE TABLE prompt_sets (
            name        VARCHAR PRIMARY KEY,
            source      VARCHAR,
            created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE prompts (
            id           VARCHAR PRIMARY KEY,
            set_name     VARCHAR NOT NULL REFERENCES prompt_sets(name),
            position     INTEGER NOT NULL,
            external_id  VARCHAR,
            messages     JSON NOT NULL,
            content_hash VARCHAR NOT NULL,
            metadata     JSON,
            created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            UNIQUE (set_name, content_hash)
        );
        CREATE TABLE model_versions (
            name          VARCHAR PRIMARY KEY,
            kind          VARCHAR NOT NULL,      -- 'full' weights or 'lora' adapter
            path          VARCHAR NOT NULL,
            content_hash  VARCHAR NOT NULL,
            source        VARCHAR NOT NULL,
            parent        VARCHAR,
            meta          JSON,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE generations (
            id                VARCHAR PRIMARY KEY,
            request_id        VARCHAR NOT NULL,   -- the n completions of one call share it
            choice_index      INTEGER NOT NULL,
            prompt_id         VARCHAR,            -- NULL for ad-hoc prompts
            messages          JSON NOT NULL,
            model_version     VARCHAR NOT NULL REFERENCES model_versions(name),
            text              VARCHAR NOT NULL,
            finish_reason     VARCHAR,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            latency_ms        DOUBLE,
            temperature       DOUBLE,
            top_p             DOUBLE,
            max_tokens        INTEGER,
            seed              BIGINT,
            sampling          JSON,               -- every parameter sent, for replay
            created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX generations_prompt ON generations(prompt_id);
        """,
    ),
]
