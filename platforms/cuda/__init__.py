"""cuda platform pack: probe (probe.py) and its backend table."""

BACKENDS: dict[str, str] = {}
