"""What training reads: feature shards loaded as a :class:`Dataset` (``dataset``), the content-keyed
train / validation / test split (``split``) and frozen splits in files (``splitfile``)."""

from stage2_classify.data.dataset import Dataset, DatasetError, labelled_mask, load_dataset

__all__ = ["Dataset", "DatasetError", "labelled_mask", "load_dataset"]
