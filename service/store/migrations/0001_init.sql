-- Fencing tokens Postgres has accepted, one row per lock. Only ever rises.
CREATE TABLE lock_fences (
    lock_name   text PRIMARY KEY,
    fence       bigint NOT NULL CHECK (fence > 0),
    accepted_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sync_runs (
    id           uuid PRIMARY KEY,
    lock_name    text NOT NULL,
    trigger      text NOT NULL CHECK (trigger IN ('manual', 'scheduled')),
    requested_by text NOT NULL,
    fence        bigint NOT NULL,
    instance     text NOT NULL,
    status       text NOT NULL CHECK (status IN (
        'running', 'succeeded', 'partial', 'failed', 'fenced_out', 'lost_lease',
        'abandoned', 'interrupted')),
    started_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    duration_s   double precision,
    seen         integer NOT NULL DEFAULT 0,
    added        integer NOT NULL DEFAULT 0,
    changed      integer NOT NULL DEFAULT 0,
    unchanged    integer NOT NULL DEFAULT 0,
    deactivated  integer NOT NULL DEFAULT 0,
    rejected     integer NOT NULL DEFAULT 0,
    error        text,
    sources      jsonb NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX sync_runs_started ON sync_runs (started_at DESC);
CREATE INDEX sync_runs_status_started ON sync_runs (status, started_at DESC);
-- At most one run per lock may be running: a new holder closes older ones.
CREATE UNIQUE INDEX sync_runs_one_running ON sync_runs (lock_name)
    WHERE status = 'running';

-- Prices in USD per million tokens; NULL means unknown (or variable) price.
CREATE TABLE model_prices (
    provider                  text NOT NULL,
    model_id                  text NOT NULL,
    name                      text,
    source                    text NOT NULL,
    input_usd_per_mtok        numeric,
    output_usd_per_mtok       numeric,
    cached_input_usd_per_mtok numeric,
    context_window            integer,
    active                    boolean NOT NULL DEFAULT true,
    missing_runs              integer NOT NULL DEFAULT 0,
    first_seen                timestamptz NOT NULL DEFAULT now(),
    last_changed              timestamptz NOT NULL DEFAULT now(),
    fence                     bigint NOT NULL,
    run_id                    uuid NOT NULL,
    PRIMARY KEY (provider, model_id)
);
CREATE INDEX model_prices_source ON model_prices (source, active);

CREATE TABLE model_price_changes (
    id         bigserial PRIMARY KEY,
    run_id     uuid NOT NULL,
    fence      bigint NOT NULL,
    provider   text NOT NULL,
    model_id   text NOT NULL,
    source     text NOT NULL,
    change     text NOT NULL CHECK (change IN (
        'added', 'changed', 'deactivated', 'reactivated')),
    before     jsonb,
    after      jsonb,
    changed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX model_price_changes_model ON model_price_changes (provider, model_id, id);
CREATE INDEX model_price_changes_run ON model_price_changes (run_id);
