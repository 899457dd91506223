"""Generative models written as Pyro programs. Import as ``ppl_vae.models.<module>``."""
