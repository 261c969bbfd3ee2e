"""Building blocks of the stage-2 methods: frozen dilated backbones, QGNet's region maps, PFENet's FEM decoder,
and the ``model.*`` config schema."""
