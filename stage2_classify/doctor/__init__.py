"""The data doctor: likely-mislabelled images, duplicates and split leakage, outliers.

``examine`` holds :func:`doctor` (gather the inputs, run the checks, write the findings), ``sources`` what it
reads besides the shards (splits, out-of-fold probabilities, the image root), ``checks`` the pure checks and
``neighbours`` the cosine nearest-neighbour search they share.
"""

from stage2_classify.doctor.examine import DoctorError, DoctorResult, doctor

__all__ = ["DoctorError", "DoctorResult", "doctor"]
