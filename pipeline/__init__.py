"""The orchestrator: runs stage 1 then stage 2, skipping what is cached. It holds no stage logic.

Public API::

    from pipeline import run, predict, compare
    result = run("data/animal_mnist", "work/demo")            # extract (cached per backbone) + train
    predict("new_images/", result.run_dir, "predictions.csv")  # extract with the model's backbone + classify
    compare("data/animal_mnist", ["efficientnet_lite0", "efficientnet_lite1"], "work/compare")
"""

from pipeline.orchestrator import PipelineResult, compare, features_dir, predict, run

__all__ = ["PipelineResult", "compare", "features_dir", "predict", "run"]
