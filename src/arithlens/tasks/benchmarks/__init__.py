"""Bring your own benchmark: ``formats`` (how each public format's rows look), ``reader`` (a file →
a suite) and ``scoring`` (generate, first-token and choice scoring)."""
