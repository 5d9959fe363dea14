"""One run's bookkeeping, whatever the engine: start and end (``lifecycle``), the incremental plan (``plan``),
shard writing (``writer``), the output lock (``lock``) and SIGTERM as Ctrl-C (``signals``)."""
