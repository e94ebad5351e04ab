"""The coordinator service: accounts, job queue, leases, kudos ledger, results store.

    config.py           CoordinatorConfig, the one configuration object
    app.py              create_app(config): the aiohttp application and its lifecycle
    settings.py         CoordinatorSettings: every flag / IDLEGRID_COORDINATOR_* variable
    network_flags.py    ... its open-network part; `--mint` and `--make-invites`
    main.py             `idlegrid coordinator` flags -> settings -> config -> serve
    api.py              route table: validation, auth, error mapping, OpenAPI
    routes_accounts.py  accounts, health, OpenAPI document
    routes_jobs.py      submit / status / SSE events / images
    routes_workers.py   worker register / pop / progress / fail
    routes_results.py   image uploads (raw PNG) and the result that verifies and pays
    routes_text.py      text jobs: submit / status / SSE text; gateway pop / delta / result;
                        block servers' peer links
    routes_openai.py    OpenAI-compatible /v1/models, /v1/chat/completions, /v1/completions
    text_store.py       text jobs' transactions: models offered, streamed text, settlement
    polling.py          the workers' long-poll
    store.py            every database transaction
    schema.py           tables and migrations (SQLite and PostgreSQL)
    ledger.py           double-entry kudos postings
    queue.py            queue order (protocol.priority) over the database, positions, ETAs
    trust.py            paying workers (trust hold), spot checks, suspicion, uptime kudos
    verification.py     comparing a spot check's images with the original's
    economy.py          transfers, ratings, account summaries and history
    ratelimit.py        token buckets per API key / worker and per IP
    routes_economy.py   quotes, cancel, share, ratings, transfers, history, worker records
    files/              stored result images and upload markers, in --data-dir or the
                        database (--file-store); streaming uploads to a local spool
    png_check.py        an upload is a valid PNG of the job's size (bombs refused)
    signals.py          in-process wake-ups for long-polls and streams
    state.py            typed app state keys
    errors.py           CoordinatorError and its HTTP statuses

Never imports torch: it only moves parameters, bytes and kudos.
"""

from coordinator.config import CoordinatorConfig

__all__ = ["CoordinatorConfig"]
