"""The QGNet segmenter: frozen backbones, prior / guided region maps, category guider, FEM decoder."""
