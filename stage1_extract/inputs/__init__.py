"""What a run reads: listing a class-folder tree, a flat folder or a file list (``listing``, with the group regex),
and the DICOM rows of a listing (``dicom_records``: salted patient groups, one row per frame)."""
