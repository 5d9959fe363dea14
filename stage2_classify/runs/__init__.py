"""The run directory ``train`` writes and everything else reads: what it holds (``layout``), the atomic folder
writer (``writer``), filling it with a trained head's files (``files``) and loading / checking it (``load``)."""
