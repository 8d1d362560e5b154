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
    (
        "002_annotation",
        """
        CREATE TABLE users (
            name          VARCHAR PRIMARY KEY,
            role          VARCHAR NOT NULL,   -- annotator | expert | engineer | admin
            password_hash VARCHAR NOT NULL,   -- argon2id
            token_hash    VARCHAR UNIQUE,     -- sha256 of the REST token; the token is shown once
            disabled      BOOLEAN NOT NULL DEFAULT false,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE aliases (
            name        VARCHAR PRIMARY KEY,  -- e.g. 'policy'
            version     VARCHAR NOT NULL REFERENCES model_versions(name),
            updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE campaigns (
            name          VARCHAR PRIMARY KEY,
            kind          VARCHAR NOT NULL,   -- 'label' (battles arrive with the arena)
            prompt_set    VARCHAR NOT NULL REFERENCES prompt_sets(name),
            model         VARCHAR NOT NULL,   -- a version or an alias, resolved when sampled
            n             INTEGER NOT NULL,
            sampling      JSON NOT NULL,
            overlap       INTEGER NOT NULL,   -- k different annotators per task
            task_timeout_s INTEGER NOT NULL,  -- an assignment not submitted by then goes back
            guidelines    VARCHAR NOT NULL DEFAULT '',
            status        VARCHAR NOT NULL DEFAULT 'active',
            created_by    VARCHAR,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE tasks (
            id             VARCHAR PRIMARY KEY,
            campaign       VARCHAR NOT NULL REFERENCES campaigns(name),
            prompt_id      VARCHAR NOT NULL REFERENCES prompts(id),
            model_version  VARCHAR NOT NULL,  -- what the alias resolved to at sampling time
            generation_ids VARCHAR[] NOT NULL,
            created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
            UNIQUE (campaign, prompt_id)
        );
        CREATE TABLE assignments (
            id          VARCHAR PRIMARY KEY,  -- also the idempotency key of its judgment
            task_id     VARCHAR NOT NULL REFERENCES tasks(id),
            annotator   VARCHAR NOT NULL REFERENCES users(name),
            display_order VARCHAR[] NOT NULL, -- generation ids in the shuffled order shown
            assigned_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            expires_at  TIMESTAMPTZ NOT NULL,
            status      VARCHAR NOT NULL DEFAULT 'open',  -- open | done | skipped
            UNIQUE (task_id, annotator)
        );
        CREATE TABLE judgments (
            id              VARCHAR PRIMARY KEY,
            idempotency_key VARCHAR NOT NULL UNIQUE,
            assignment_id   VARCHAR NOT NULL,
            campaign        VARCHAR NOT NULL,
            task_id         VARCHAR NOT NULL,
            annotator       VARCHAR NOT NULL,
            generation_ids  VARCHAR[] NOT NULL,  -- in the order shown to the annotator
            ranks           INTEGER[] NOT NULL,  -- rank per shown completion; 1 = best, equal = tie
            all_bad         BOOLEAN NOT NULL,
            strength        INTEGER,             -- 1 slight, 2 clear, 3 strong
            flags           JSON NOT NULL,       -- {generation_id: [flag, ...]}
            rationale       VARCHAR,
            edited_text     VARCHAR,             -- the best answer edited into an ideal one
            edited_from     VARCHAR,             -- generation id it was edited from
            shown_at        TIMESTAMPTZ,
            submitted_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
            duration_ms     DOUBLE
        );
        CREATE INDEX judgments_campaign ON judgments(campaign);
        CREATE INDEX assignments_task ON assignments(task_id);
        -- Pairs are derived, never stored: every ordered pair (i, j) of shown
        -- completions where i is ranked strictly better, plus tie pairs once.
        CREATE VIEW judgment_pairs AS
        WITH items AS (
            SELECT j.id AS judgment_id, j.campaign, j.task_id, j.annotator, j.strength, j.all_bad,
                   unnest(j.generation_ids) AS generation_id,
                   unnest(j.ranks) AS rank,
                   unnest(range(len(j.generation_ids))) AS position
            FROM judgments j
        )
        SELECT a.judgment_id, a.campaign, a.task_id, a.annotator, a.strength, a.all_bad,
               a.generation_id AS chosen_id, b.generation_id AS rejected_id,
               a.rank AS chosen_rank, b.rank AS rejected_rank,
               a.position AS chosen_position, b.position AS rejected_position,
               a.rank = b.rank AS is_tie
        FROM items a JOIN items b
          ON a.judgment_id = b.judgment_id
         AND (a.rank < b.rank OR (a.rank = b.rank AND a.position < b.position));
        """,
    ),
    (
        "003_arena",
        """
        -- A battle campaign is a campaigns row of kind 'battle' plus these settings.
        CREATE TABLE battle_campaigns (
            name           VARCHAR PRIMARY KEY REFERENCES campaigns(name),
            versions       VARCHAR[] NOT NULL,   -- versions or aliases, resolved when sampled
            budget         INTEGER NOT NULL,     -- votes after which the campaign stops
            both_bad_as_tie BOOLEAN NOT NULL DEFAULT true,
            leak_words     VARCHAR[] NOT NULL,   -- an answer containing one reveals an identity
            criteria       VARCHAR[] NOT NULL,   -- optional per-criterion scores
            verdict        VARCHAR               -- set when the campaign stops by itself
        );
        CREATE TABLE battles (
            id           VARCHAR PRIMARY KEY,   -- opaque: says nothing about the versions
            campaign     VARCHAR NOT NULL REFERENCES campaigns(name),
            prompt_id    VARCHAR NOT NULL REFERENCES prompts(id),
            version_a    VARCHAR NOT NULL,      -- after the random side assignment
            version_b    VARCHAR NOT NULL,
            generation_a VARCHAR NOT NULL,
            generation_b VARCHAR NOT NULL,
            leak         VARCHAR,               -- what revealed an identity; such battles are not served
            status       VARCHAR NOT NULL DEFAULT 'ready',  -- ready | assigned | voted
            expert       VARCHAR,
            assigned_at  TIMESTAMPTZ,
            created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE votes (
            id              VARCHAR PRIMARY KEY,
            idempotency_key VARCHAR NOT NULL UNIQUE,
            battle_id       VARCHAR NOT NULL UNIQUE REFERENCES battles(id),  -- one vote locks a battle
            campaign        VARCHAR NOT NULL,
            expert          VARCHAR NOT NULL,
            winner          VARCHAR NOT NULL,   -- a | b | tie | both_bad
            scores          JSON NOT NULL,      -- {criterion: {"a": int, "b": int}}
            rationale       VARCHAR,
            duration_ms     DOUBLE,
            created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX battles_campaign ON battles(campaign);
        """,
    ),
    (
        "004_training",
        """
        CREATE TABLE snapshots (
            id            VARCHAR PRIMARY KEY,   -- 'snap-' + the first 16 hex digits of content_hash
            content_hash  VARCHAR NOT NULL,      -- sha256 of the rows (trainers.common.rows_hash)
            kind          VARCHAR NOT NULL,      -- preference | unpaired | sft
            path          VARCHAR NOT NULL,      -- the immutable Parquet file
            filter        JSON NOT NULL,         -- what was asked for: campaigns, kind
            rows          INTEGER NOT NULL,
            created_by    VARCHAR,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE TABLE snapshot_judgments (
            snapshot_id   VARCHAR NOT NULL REFERENCES snapshots(id),
            judgment_id   VARCHAR NOT NULL,
            PRIMARY KEY (snapshot_id, judgment_id)
        );
        CREATE TABLE runs (
            id            VARCHAR PRIMARY KEY,
            stages        VARCHAR[] NOT NULL,    -- ['dpo'], or ['ppo', 'dpo'] for the pipeline
            status        VARCHAR NOT NULL,      -- queued | running | succeeded | failed | cancelled
            parent        VARCHAR NOT NULL REFERENCES model_versions(name),
            reward_model  VARCHAR,               -- for ppo: a reward version
            recipes       JSON NOT NULL,         -- stage -> recipe file
            overrides     JSON NOT NULL,         -- stage -> {key: value}
            snapshot_id   VARCHAR NOT NULL REFERENCES snapshots(id),
            output_dir    VARCHAR NOT NULL,
            versions      VARCHAR[],             -- the versions each finished stage registered
            rebattle      VARCHAR,               -- the blind battle campaign new vs parent
            created_by    VARCHAR NOT NULL,
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
            started_at    TIMESTAMPTZ,
            finished_at   TIMESTAMPTZ,
            reason        VARCHAR,               -- why it failed or was cancelled
            metrics       JSON                   -- stage -> final metrics
        );
        -- judgment -> snapshot -> run -> version, one row per link
        CREATE VIEW lineage AS
            SELECT sj.judgment_id, s.id AS snapshot_id, s.content_hash, r.id AS run_id, r.stages,
                   r.status, v.name AS version, v.parent AS parent_version
            FROM snapshot_judgments sj
            JOIN snapshots s ON s.id = sj.snapshot_id
            LEFT JOIN runs r ON r.snapshot_id = s.id
            LEFT JOIN model_versions v ON list_contains(r.versions, v.name);
        """,
    ),
    (
        "005_battle_alpha",
        """
        -- The error level of a two-version duel's stopping rule (studio/sequential.py).
        ALTER TABLE battle_campaigns ADD COLUMN alpha DOUBLE NOT NULL DEFAULT 0.05;
        """,
    ),
    (
        "006_security",
        """
        -- Every refused login: a wrong password or unknown name, or an attempt refused by the
        -- rate limit before its password was checked (one row per lock, not per refusal).
        CREATE TABLE failed_logins (
            attempted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            user_name    VARCHAR NOT NULL,   -- as typed, cut to 128 characters
            address      VARCHAR,            -- the client's address as the server saw it
            reason       VARCHAR NOT NULL    -- wrong password | unknown or disabled user | rate limited: ...
        );
        """,
    ),
    (
        "007_evaluation",
        """
        -- One evaluation: a version measured against another on some suites (studio/evals).
        CREATE TABLE evals (
            id           VARCHAR PRIMARY KEY,
            version      VARCHAR NOT NULL,
            against      VARCHAR NOT NULL,
            suites       VARCHAR[] NOT NULL,
            seed         BIGINT NOT NULL,
            settings     JSON NOT NULL,        -- temperature, limit, judge, waived, gate config
            status       VARCHAR NOT NULL,     -- queued | running | succeeded | failed
            created_by   VARCHAR,
            created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            started_at   TIMESTAMPTZ,
            finished_at  TIMESTAMPTZ,
            result       JSON,                 -- {version, against, metrics, gate}: `studio eval --json`
            details      JSON,                 -- per suite: the eval_runs used, cache hits, timings
            error        VARCHAR
        );
        CREATE INDEX evals_version ON evals(version);
        -- One suite run on one version: the unit that is cached. The same version (same weights),
        -- suite file, seed and settings give the same run, reused by later evaluations.
        CREATE TABLE eval_runs (
            id            VARCHAR PRIMARY KEY,
            version       VARCHAR NOT NULL,
            version_hash  VARCHAR NOT NULL,    -- model_versions.content_hash when it ran
            suite         VARCHAR NOT NULL,
            suite_hash    VARCHAR NOT NULL,    -- sha256 of the suite file
            seed          BIGINT NOT NULL,
            settings_hash VARCHAR NOT NULL,
            settings      JSON NOT NULL,       -- generation, limit, judge, the other version (pairwise)
            metrics       JSON NOT NULL,       -- metric -> mean item score of this run
            items         INTEGER NOT NULL,
            duration_s    DOUBLE NOT NULL,     -- the whole run: requests, scoring, storing
            generate_s    DOUBLE NOT NULL,     -- wall time spent waiting on the model server
            created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
            UNIQUE (version, version_hash, suite, suite_hash, seed, settings_hash)
        );
        -- Every item of a run with what the model said, so any number traces to its answers.
        CREATE TABLE eval_items (
            run_id    VARCHAR NOT NULL REFERENCES eval_runs(id),
            item_id   VARCHAR NOT NULL,
            metric    VARCHAR NOT NULL,        -- the metric this item counts toward
            score     DOUBLE NOT NULL,         -- the item's score in that metric (1/0, or agreement)
            prompt    JSON NOT NULL,           -- the chat messages sent
            outputs   VARCHAR[] NOT NULL,      -- the answers (k samples; for pairwise: version, other)
            parsed    JSON,                    -- what the scorer read: alias matched, refusal phrase, choice
            logprobs  JSON,                    -- multiple choice: per choice token ids and log-probabilities
            detail    JSON,                    -- checker results, judge replies, similarities
            PRIMARY KEY (run_id, item_id)
        );
        """,
    ),
    (
        "008_promotions",
        """
        -- Every move of an alias and every gate decision (studio/promotion.py): promotions by the
        -- gate or a person (forced or not), holds with the gate's reasons, roll-backs.
        CREATE TABLE promotions (
            id              VARCHAR PRIMARY KEY,
            action          VARCHAR NOT NULL,    -- promote | hold | rollback
            alias           VARCHAR NOT NULL,    -- the alias concerned (policy by default)
            version         VARCHAR NOT NULL,    -- the version decided on (promote, hold) or moved back to
            from_version    VARCHAR,             -- where the alias pointed before
            decided_by      VARCHAR NOT NULL,    -- 'gate', or the user who acted
            forced          BOOLEAN NOT NULL DEFAULT false,  -- promoted although the gate did not pass
            passed          BOOLEAN,             -- the gate's answer at the time (NULL: rollback)
            reasons         JSON NOT NULL,       -- the gate's reasons, each failing rule with its numbers
            eval_id         VARCHAR,             -- the evaluation the gate read
            battle_campaign VARCHAR,             -- the re-battle whose verdict it read
            verdict         VARCHAR,             -- better | worse | undecided | none
            decided_at      TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX promotions_version ON promotions(version);
        -- Which prompts a run's re-battle may use: never one the version (or an ancestor) trained on.
        ALTER TABLE runs ADD COLUMN eval_prompt_set VARCHAR;    -- a prompt set marked for evaluation
        ALTER TABLE runs ADD COLUMN rebattle_prompts VARCHAR;   -- what the re-battle samples: heldout-<run>
        ALTER TABLE runs ADD COLUMN trained_prompts VARCHAR[];  -- content hashes of the prompts trained on
        ALTER TABLE runs ADD COLUMN notes VARCHAR[];            -- what the run said when it was submitted
        """,
    ),
    (
        "009_run_launch",
        """
        -- How a run's stages are started (studio/launchers.py): {"launcher": local | accelerate |
        -- ray, "num_processes": N} as the run asked (NULL: the studio's default), replaced by what
        -- it started with once it runs, plus the Ray job ids ("ray_jobs") it submitted.
        ALTER TABLE runs ADD COLUMN launch JSON;
        """,
    ),
    (
        "010_root_evaluation",
        """
        -- The evaluation against the version's lineage's root whose guards the gate also read
        -- (data/gate.yaml guard_against_root): a new one is new evidence, decided again.
        ALTER TABLE promotions ADD COLUMN root_eval_id VARCHAR;
        """,
    ),
]
