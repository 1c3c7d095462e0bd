"""The worker: consumes task messages, runs handlers, stores results, reports progress."""
