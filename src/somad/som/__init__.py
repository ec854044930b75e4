"""The self-organizing map and what SOMAD keeps per node: training, node statistics, nearest-node search."""
