"""Using a trained run: the :class:`Classifier` (``classifier``), ``predict()`` (``predict``), images, shards or
vectors turned into feature vectors (``inputs``), the open-set ``unknown`` flag (``ood``) and the one-file ONNX
export (``export``)."""
