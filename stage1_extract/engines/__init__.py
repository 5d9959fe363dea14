"""Where a run's images are processed: one runner (``runner``: the start and end of every run) and the engines
it drives, ``local`` (processes on this machine) and Ray (``ray_driver`` on the driver, ``ray_tasks`` on the
workers)."""
