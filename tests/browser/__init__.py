"""The coordinator's web page driven in headless Chromium against real processes."""
