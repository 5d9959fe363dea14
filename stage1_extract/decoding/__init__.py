"""File bytes to model-sized uint8 pixels: reading (``files``), PIL and DICOM decoding (``image``, ``dicom``,
``windowing``), the worker-process pool (``pool``, ``pool_tasks``, ``worker``, ``shm``), the GPU decoders
(``torch_decoder``, ``nvimgcodec``), what they all yield (``batches``) and which one a run gets (``factory``).
Imported by decode worker processes: nothing here imports torch or onnxruntime at module level."""
