"""How good a head is: classification metrics with bootstrap intervals (``metrics``), calibration
(``calibration``) and ``evaluate()`` of a run on labelled shards (``evaluate``)."""
