"""Drop-in replacements for other Kissmetrics client libraries, spooling instead of
sending (``kmagent.compat.kissmetrics`` for py-KISSmetrics)."""
