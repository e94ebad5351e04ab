"""Kudos beyond the ledger's postings (coordinator.db.ledger):

kudos.py            Ledger (store.ledger): balances, audit, mint, transfers, ratings,
                    account summaries, history, quotes
payments.py         paying workers (trust hold), releases, AI Horde holds and disputes,
                    uptime kudos
checks.py           spot checks: independence, scheduling, verdicts (quorum of two)
check_refiner.py    which checker's refiner setup makes a checked job's pixels
suspicion.py        suspicion and the one way a worker (and its owner) is paused
text_settlement.py  a finished text job's report checked, charged and paid out
horde_text.py       an AI Horde text worker's text: tokens estimated, priced, held
text_checks.py      text spot checks: gateways' checks of block servers, gateways re-run
text_models.py      the text model catalog and gateways' offers
image_models.py     the image model reference: checkpoint hashes at pop, limits, prices
verification.py     comparing a spot check's images with the original's
"""

__all__: list[str] = []
