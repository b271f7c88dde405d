"""FOT's message protocol: the query its strategy sends and the records both halves exchange."""

ACTIVATIONS_QUERY = "query.fot_activations"
BASES_KEY = "fot-bases"  # ArrayRecord in the query: layer name -> U (d, k) float32
SKETCHES_KEY = "fot-sketches"  # ArrayRecord in the reply: layer name -> R Q (d, m)
RATIO_PREFIX = "residual-ratio/"  # reply metric per layer
BASIS_METRIC_PREFIX = "fot-basis/"  # train metric per layer: columns of its basis
LAYERS = "layers"  # query config: the protected layers' module names
PROJECTION = "projection"  # query config: "uniform" | "gaussian" random projection entries
SKETCH_FACTOR = "sketch-factor"  # query config: m = sketch-factor · d sketch columns
