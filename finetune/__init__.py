"""Stage 2: few-shot segmenters trained and evaluated per fold: the method registry (``methods/``: qgnet, pfenet,
the training-free prototype baseline), their building blocks (``model/``), the training loop and the entry points
(``run.py``, ``evaluate.py``, ``predict.py``, ``app.py``, ``fscs.py``)."""
