"""fedcl: a Ray-distributed simulator for federated continual learning."""
