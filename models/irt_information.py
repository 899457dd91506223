"""The observed information of a marginal exam model in closed form (the Laplace Hessian).

A marginal exam model (``irt_marginal.MarginalIRT``) writes each student's log marginal
likelihood as a log-sum over quadrature nodes q (weights w_q) of a linear function of the
item parameters' "steps" S(phi) (J x Q; J = answer indicators, Q = nodes):

    log p(y_s | phi) = logsumexp_q [ log w_q + sum_j C_sj S_jq(phi) ]   (C: the (N, J) counts)

With W_sq the posterior weight of node q for student s (the softmax above), the exact Hessian
of sum_s log p(y_s | phi) is, by the chain rule through S,

    H = sum_q Jac_q^T M_q Jac_q  -  sum_s g_s g_s^T  +  d^2/dphi^2 [ sum_jq A_jq S_jq(phi) ]

    M_q = C^T diag(W_:q) C   (J x J),   A = C^T W   (J x Q),   Jac = dS/dphi   (J x Q x P),
    g_s = sum_jq C_sj W_sq Jac_jq   (the score of student s, P).

Every term is a few dense matrix products over the students, so the P x P Hessian costs
about as much as Q gradient evaluations, not P of them as autograd's one backward pass per
parameter does (100,000 students x 100 items: ~3 s instead of ~23 s, see
benchmarks/RESULTS.md). Per-student scores use that each column of S depends on the
parameters of one item only (found from the Jacobian's sparsity; dense otherwise).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


def marginal_hessian(steps: Callable[[torch.Tensor], torch.Tensor], phi: torch.Tensor,
                     counts: torch.Tensor, log_weights: torch.Tensor, *,
                     chunk_size: int = 4096, dtype: torch.dtype = torch.float64,
                     node_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The exact Hessian (P, P) of sum_s log p(y_s | phi) (nats) at ``phi``.

    Args:
        steps: phi (P,) -> S (J, Q), the per-indicator log-likelihood steps at each node (a
            differentiable torch function; no Pyro).
        phi: (P,) the point (the mode), float64 recommended.
        counts: (N, J) answer indicators C of the students (0/1), any device.
        log_weights: (Q,) log quadrature weights (summing to 1 in probability).
        chunk_size: students per chunk (memory: chunk x J floats).
        dtype: accumulation and result dtype; ``node_dtype``: of the Q products C^T diag(W) C,
            the costly part (float32 halves the time; their sums are accumulated in ``dtype``).
    """
    phi = phi.detach().to(dtype)
    S = steps(phi).detach().to(dtype)                                     # (J, Q)
    num_indicators, num_nodes = S.shape
    with warnings.catch_warnings():  # torch's forward-mode AD loads its decompositions
        warnings.filterwarnings("ignore", ".*torch.jit.script.*", FutureWarning)
        jac = torch.func.jacfwd(steps)(phi).to(dtype)                     # (J, Q, P)
    num_params = jac.shape[-1]
    log_w = log_weights.to(dtype=dtype, device=S.device)
    nonzero = jac.abs().amax(1) > 0                                       # (J, P)
    width = int(nonzero.sum(1).max()) if num_indicators else 0
    sparse = 0 < width <= 16
    if sparse:  # the parameters each indicator depends on: (J, R) indices, padded with P
        order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :width]
        valid = nonzero.gather(1, order)
        index = torch.where(valid, order, num_params)
        jac_compact = jac.permute(0, 2, 1).gather(
            1, order.unsqueeze(-1).expand(-1, -1, num_nodes)).permute(0, 2, 1)
        jac_compact = jac_compact * valid.unsqueeze(1)                   # (J, Q, R)
    accumulated_a = torch.zeros(num_indicators, num_nodes, dtype=dtype, device=S.device)
    accumulated_m = torch.zeros(num_nodes, num_indicators, num_indicators, dtype=dtype,
                                device=S.device)
    scores_outer = torch.zeros(num_params, num_params, dtype=dtype, device=S.device)
    for start in range(0, len(counts), chunk_size):
        c = counts[start:start + chunk_size].to(device=S.device, dtype=dtype)
        joint = c @ S + log_w
        w = torch.softmax(joint, -1)                                      # (B, Q)
        accumulated_a += c.T @ w
        c_low, w_low = c.to(node_dtype), w.to(node_dtype)
        for q in range(num_nodes):
            accumulated_m[q] += ((c_low * w_low[:, q:q + 1]).T @ c_low).to(dtype)
        if sparse:
            v = torch.einsum("bq,jqr->bjr", w, jac_compact) * c.unsqueeze(-1)
            g = torch.zeros(len(c), num_params + 1, dtype=dtype, device=S.device)
            g.scatter_add_(1, index.reshape(1, -1).expand(len(c), -1), v.reshape(len(c), -1))
            g = g[:, :num_params]
        else:
            g = torch.einsum("bj,bq,jqp->bp", c, w, jac)
        scores_outer += g.T @ g
    first = torch.einsum("jqp,qjk,kqr->pr", jac, accumulated_m, jac)

    def weighted_steps(x: torch.Tensor) -> torch.Tensor:
        return (accumulated_a * steps(x).to(dtype)).sum()

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*torch.jit.script.*", FutureWarning)
        curvature = torch.func.hessian(weighted_steps)(phi)
    hessian = first - scores_outer + curvature
    return 0.5 * (hessian + hessian.T)


def laplace_guide(model, values: dict[str, torch.Tensor], responses: torch.Tensor,
                  mask: torch.Tensor | None, args: tuple, kwargs: dict,
                  chunk_size: int = 4096):
    """The Laplace approximation N(mode, H^-1) of a marginal exam model's item posterior as an
    ``AutoMultivariateNormal`` (loc, scale, scale_tril buffers, as Pyro's
    ``AutoLaplaceApproximation.laplace_approximation`` returns), H the exact Hessian of the
    negative log joint at ``values`` (the mode): :func:`marginal_hessian` for the likelihood
    over all ``responses`` plus autograd's for the prior. ``model`` is a ``MarginalIRT``
    (latent sites on the real line); ``args``/``kwargs`` a cheap call of it that sets up the
    guide's prototype."""
    from pyro import poutine
    from pyro.distributions import constraints
    from pyro.infer.autoguide import AutoMultivariateNormal, init_to_value

    gaussian = AutoMultivariateNormal(model, init_loc_fn=init_to_value(values=values))
    gaussian._setup_prototype(*args, **kwargs)
    names = list(gaussian._unconstrained_shapes)
    for name in names:
        site = gaussian.prototype_trace.nodes[name]
        if site["fn"].support is not constraints.real:
            raise ValueError(f"site {name!r} is not on the real line; the closed-form "
                             "Laplace approximation needs unconstrained item sites")
    shapes = [gaussian._unconstrained_shapes[n] for n in names]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    device = model.nodes.device
    phi = torch.cat([values[n].detach().to(device=device, dtype=torch.float64).reshape(-1)
                     for n in names])

    def unflatten(x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: v.reshape(s) for n, v, s in zip(names, torch.split(x, sizes), shapes)}

    def steps(x: torch.Tensor) -> torch.Tensor:
        items = model.item_parameters(unflatten(x))
        log_p = model.category_log_probs(model.nodes.to(x.dtype), items)
        return model.cumulative_differences(log_p).flatten(-2).T        # (J, Q)

    def log_prior(x: torch.Tensor) -> torch.Tensor:
        conditioned = poutine.condition(model.sample_items, data=unflatten(x))
        trace = poutine.trace(conditioned).get_trace(device, torch.float64)
        return trace.log_prob_sum()

    counts = model.response_counts(responses.to(device), None if mask is None
                                   else mask.to(device), torch.get_default_dtype())
    likelihood = marginal_hessian(steps, phi, counts, model.log_weights,
                                  chunk_size=chunk_size)
    prior = torch.autograd.functional.hessian(log_prior, phi)
    precision = -(likelihood + prior)
    with torch.no_grad():
        cov = torch.linalg.inv(precision)
        scale = cov.diagonal().sqrt()
        corr = cov / scale[:, None] / scale[None, :]
        scale_tril = torch.linalg.cholesky(corr)
    dtype = torch.get_default_dtype()
    del gaussian.loc, gaussian.scale, gaussian.scale_tril
    gaussian.register_buffer("loc", phi.to(dtype))
    gaussian.register_buffer("scale", scale.to(dtype))
    gaussian.register_buffer("scale_tril", scale_tril.to(dtype))
    return gaussian
