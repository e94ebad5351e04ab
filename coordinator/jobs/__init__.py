"""One lifecycle for every job kind, the queue and its wake-ups, result files."""
