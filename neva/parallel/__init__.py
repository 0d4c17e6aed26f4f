"""The parallel plan: mesh, collectives, placement rules, pipeline schedules."""
