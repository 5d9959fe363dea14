"""The classifier head: Normalization → [Dense(relu) → Dropout]* → Dense(softmax).

Standardisation is the first layer (its mean and variance are weights of the model), so a saved
``model.keras`` takes raw feature vectors and needs nothing else at prediction time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def build_head(feature_dim: int, n_classes: int, *, hidden: Sequence[int] = (256,), dropout: float = 0.3,
               learning_rate: float = 1e-3, mean: np.ndarray | None = None, variance: np.ndarray | None = None):
    """A compiled Keras model. Standardisation is a layer inside the model, so a saved model needs nothing else.

    ``hidden=()`` gives a linear (multinomial logistic-regression) head; ``mean``/``variance`` are the
    training-split statistics used to standardise inputs (zero mean / unit variance when omitted).
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
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model
