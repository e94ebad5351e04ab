"""The coordinator service: accounts, job queue, leases, kudos ledger, results store.

    main.py             `idlegrid coordinator`: flags/env/TOML -> settings -> config -> serve
                        (`--processes N` supervises N children)
    settings.py         CoordinatorSettings: every flag / IDLEGRID_COORDINATOR_* variable
    network_flags.py    ... its open-network part; `--mint` and `--make-invites`
    config.py           CoordinatorConfig, the one configuration object
    app.py              create_app(config): the aiohttp application and its lifecycle
    clock.py            the injected clock (tests pass a MockClock)
    errors.py           CoordinatorError and its HTTP statuses
    http/               the doors: the route table (api.py, typed inputs in params.py),
                        /api/v1, AI Horde's /api/v2 (horde.py, horde_workers.py), OpenAI
                        (openai.py), the web page (web.py, static/), /metrics, docs, event
                        streams, long-polls, rate limits, request bodies
    store.py            Store: holds accounts, workers, ledger, image_jobs, text_jobs and
                        network over one Database
    jobs/               one Lifecycle for both job kinds (image.py, text.py), the queue and
                        its ranking, the hot path's statements, wake-ups, LISTEN/NOTIFY
    files/              stored result images and upload markers, in --data-dir or the
                        database (--file-store); streaming uploads to a local spool
    workers.py          Workers: registration, tokens, engines, identities per account
    economy/            the ledger as users see it (kudos.py), payments, spot checks,
                        suspicion and pauses, text settlement and checks, verification,
                        the text model catalog
    accounts.py         Accounts: registration, invites, API keys, the operator's mint
    db/                 Database (engine, transactions; SQLite through our own dialect,
                        inline_sqlite.py), schema, double-entry ledger postings, Alembic
                        migrations, the hot path's raw statements

Never imports torch: it only moves parameters, bytes and kudos.
"""

from coordinator.config import CoordinatorConfig

__all__ = ["CoordinatorConfig"]
