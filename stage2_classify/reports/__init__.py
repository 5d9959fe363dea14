"""What people look at: the self-contained HTML building blocks (``html``), the training run's ``report.html``
(``run_report``), the doctor's (``doctor_report``) and the PNG plots of a run (``plots``), drawn on
``matplotlib.figure.Figure`` so the caller's plotting backend is never switched."""
