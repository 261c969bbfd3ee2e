"""The few-shot segmentation protocol both stages share: benchmarks, episodes, metrics, evaluation, results.

This package is the bottom of the project (it imports only ``common``): ``finetune/`` trains segmenters and
scores them here, ``pretrain/``'s probe scores a prior here, and neither stage imports the other.
"""
