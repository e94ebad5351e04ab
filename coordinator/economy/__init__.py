"""Kudos beyond the ledger: quotes, transfers, ratings, trust and verification."""
