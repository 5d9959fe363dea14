"""The classifier head: Normalization → [Dense(relu) → Dropout]* → Dense(softmax).

Standardisation is the first layer (its mean and variance are weights of the model), so a saved
``model.keras`` takes raw feature vectors and needs nothing else at prediction time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def build_head(feature_dim: int, n_classes: int, *, hidden: Sequence[int] = (256,), dropout: float = 0.3,
               learning_rate: float = 1e-3, mean: np.ndarray | None = None, variance: np.ndarray | None = None,
               weight_decay: float = 0.0):
    """A compiled Keras model. Standardisation is a layer inside the model, so a saved model needs nothing else.

    ``hidden=()`` gives a linear (multinomial logistic-regression) head; ``mean``/``variance`` are the
    training-split statistics used to standardise inputs (zero mean / unit variance when omitted);
    ``weight_decay`` > 0 compiles it with AdamW instead of Adam.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(feature_dim,), name="features")
    norm = layers.Normalization(
        axis=-1, name="standardise",
        mean=np.zeros(feature_dim, np.float32) if mean is None else np.asarray(mean, np.float32),
        variance=np.ones(feature_dim, np.float32) if variance is None
        else np.maximum(np.asarray(variance, np.float32), 1e-6),  # constant features: no division by zero
    )
    x = norm(inputs)
    for i, units in enumerate(hidden):
        x = layers.Dense(int(units), activation="relu", name=f"hidden_{i}")(x)
        if dropout > 0:
            x = layers.Dropout(dropout, name=f"dropout_{i}")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name="feature_classifier")
    model.compile(
        optimizer=(keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay) if weight_decay > 0
                   else keras.optimizers.Adam(learning_rate=learning_rate)),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def linear_to_keras(head, n_classes: int):
    """A fitted :class:`~stage2_classify.training.linear.LinearHead` as the Keras head with ``hidden=()``: the
    same probabilities, saved in ``model.keras`` like every other head.

    Keras divides by ``max(sqrt(variance), 1e-3)`` here (``build_head`` floors the variance at 1e-6) where the
    linear fit divided by ``scale``; the kernel is rescaled by the ratio, so the two agree exactly.
    """
    scale = np.asarray(head.scale, np.float64)
    model = build_head(len(scale), n_classes, hidden=(), mean=head.mean, variance=scale ** 2)
    keras_scale = np.sqrt(np.maximum(scale ** 2, 1e-6))
    kernel = np.asarray(head.weights, np.float64) * (keras_scale / scale)[:, None]
    model.get_layer("probabilities").set_weights([kernel.astype(np.float32), np.asarray(head.bias, np.float32)])
    return model
