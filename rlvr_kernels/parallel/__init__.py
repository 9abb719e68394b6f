"""Scale-out: the collectives and cross-rank combinations behind the ops' process-group keywords."""
