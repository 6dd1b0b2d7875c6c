"""Training: the small optax trainer that produces the shipped checkpoint."""
