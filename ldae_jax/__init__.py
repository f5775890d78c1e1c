"""ldae_jax: Latent Diffusion Autoencoders for 3D brain MRI in JAX/Flax NNX."""

__version__ = "0.1.0"
