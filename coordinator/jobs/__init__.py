"""One lifecycle for every job kind, the queue and its wake-ups (files: coordinator.files)."""
