"""Stage 2: the QGNet few-shot segmenter (frozen backbone + frozen prior, region maps, FEM decoder)."""
