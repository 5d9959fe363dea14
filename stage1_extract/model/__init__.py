"""The backbone: which one (``registry``), its weights and torch model (``weights``), its ONNX export and cache
(``export``), the graph surgery every ONNX model gets (``onnx_graph``), its preprocessing, and the model that made
a run's vectors (``deploy``). Nothing here is imported by the decode workers except ``preprocessing``."""
