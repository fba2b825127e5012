"""Fault-injection suite of issue 3: real worker processes, a real redis-server, a real ClickHouse engine.

Run it alone with ``pytest -m faults tests/faults`` or, for the table, ``python -m tests.faults``.
"""
