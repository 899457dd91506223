"""Amortized Dirichlet guide: q(theta_i | x_i) = Dirichlet(alpha(x_i)) for a simplex latent.

The encoder maps an example's data to the concentration alpha(x_i) > 0 (shape (B, K)); the
Dirichlet is reparameterized (Pyro/torch draw it with implicit gradients, Figurnov et al.
2018), so the ELBO's gradient flows through the sample as for a Normal. Serves any model
whose local latent site lies on the simplex (the topic proportions ``theta`` of neural LDA
or ProdLDA with a Dirichlet prior, mixture weights, ...).
"""

from __future__ import annotations

import pyro.distributions as dist

from ppl_vae.guides.amortized import AmortizedNormal


class AmortizedDirichlet(AmortizedNormal):
    """Guide for one simplex-valued local latent site inside the model's data plate.

    Same arguments and call as :class:`~ppl_vae.guides.amortized.AmortizedNormal` (site,
    plate, plate_dim, inputs), except that ``encoder(x)`` returns one tensor, the
    concentration of shape (B, K), e.g. :class:`ppl_vae.nn.DocumentEncoder` with
    ``head="dirichlet"``. The event dim is 1 (the simplex).
    """

    def __init__(self, encoder, site: str = "theta", plate: str = "data", plate_dim: int = -1,
                 inputs=None):
        super().__init__(encoder, site=site, plate=plate, event_dim=1, plate_dim=plate_dim,
                         inputs=inputs)

    def distribution(self, *args, **kwargs) -> dist.Distribution:
        """q(theta | x): batch shape (B,), event shape (K,)."""
        return dist.Dirichlet(self.at_plate_dim(
            self.encoder(self.encoder_input(*args, **kwargs)), 1))

    def mean(self, *args, **kwargs):
        """E_q[theta | x] = alpha / sum(alpha), shape (B, K)."""
        return self.distribution(*args, **kwargs).mean
