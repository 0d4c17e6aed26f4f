"""Above the model: the plan (placements, stages, gradient sums), the mesh, a rank's runtime state, the
pipeline schedule. The collectives the model calls live below it, in ``neva/comm.py``."""
