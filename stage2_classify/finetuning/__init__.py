"""Fine-tuning, the second iteration: the run's backbone trained end to end in Keras, starting from its head (LP-FT).

``finetune(run, out)`` (:mod:`.api`) reuses the run's own split (:mod:`.data`), builds one Keras model of the
registry's torch backbone and the run's head (:mod:`.model`), trains it with checkpoints that survive a kill
(:mod:`.checkpoint`), then writes an ordinary run directory whose backbone stage 1 can extract with
(``--backbone-from``), compared image for image with the frozen run (:mod:`.compare`). Options: :mod:`.options`.
"""
