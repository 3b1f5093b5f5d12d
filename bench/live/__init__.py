"""The parts of ``bench.churn`` that ``bench.soak`` shares with it: live runs of the
product's own ``sluice worker`` processes on a private stack, fed a steady stream, then an
accounting of every id.

- ``corpus``: the events, real functions with planted copies (``make_stream``);
- ``processes``: the run's isolated settings, the worker processes and their consumer
  group, and the steady producer;
- ``ledger``: reading everything back (outcomes, batches, the vector set, what balance
  buffered) and telling lost from still in flight;
- ``accounting``: every figure of the accounting and the guarantees it finds broken;
- ``report``: the accounting table and the failures, with the workers' notable log lines.
"""
