"""Prototype averaging's message protocol: its query and the record the clients answer with."""

PROTOTYPES_QUERY = "query.prototypes"
BANK_KEY = "prototype-bank"  # ArrayRecord in the reply: "sums" (classes, dim), "counts" (classes,)
