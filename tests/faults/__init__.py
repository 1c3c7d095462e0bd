"""Jepsen-style fault-injection tests: real processes, real faults, a ledger of effects."""
