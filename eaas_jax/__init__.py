"""eaas-jax: an Expert-as-a-Service Mixture-of-Experts serving stack on JAX."""
