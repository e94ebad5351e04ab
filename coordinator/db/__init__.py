"""The database: schema, migrations, the ledger and the store."""
