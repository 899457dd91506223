"""Guides (variational families), each usable by any model whose latent site matches.

Import as ``ppl_vae.guides.<module>``.
"""
