"""Training heads on a :class:`~stage2_classify.data.Dataset`: the Keras head (``head``), fitting it with early
stopping (``fit``), ``train()`` writing a run directory (``trainer``), the fast linear head cross-validation uses
(``linear``), ``sweep()`` over several heads (``sweep``) and ``cross_validate()`` (``cv``)."""
