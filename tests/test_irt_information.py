"""The closed-form Laplace Hessian of the marginal exam models equals autograd's."""

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation, init_to_value

from ppl_vae.models.irt_information import laplace_guide, marginal_hessian
from ppl_vae.models.irt_marginal import MarginalIRT, simulate


def _exam(categories, n=300, seed=1):
    d = simulate(n, categories, missing=0.3, seed=seed)
    return d["responses"].double(), d["mask"]


def _point(model, y, mask, noise=0.1):
    torch.manual_seed(0)
    init = model.initial_values(y, mask)
    return {k: (v.double() + noise * torch.randn_like(v.double())) for k, v in init.items()}


def _mode(model, y, mask):
    """The marginal MAP by L-BFGS on the log joint (a positive definite Hessian there)."""
    start = _point(model, y, mask, noise=0.0)
    names = list(start)
    x = torch.cat([start[n] for n in names]).requires_grad_()
    sizes = [start[n].numel() for n in names]
    optimizer = torch.optim.LBFGS([x], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        values = dict(zip(names, torch.split(x, sizes)))
        prior = pyro.poutine.trace(pyro.poutine.condition(model.sample_items, data=values)
                                   ).get_trace(None, torch.float64).log_prob_sum()
        loss = -(model.log_marginal(y, mask, model.item_parameters(values)).sum() + prior)
        loss.backward()
        return loss

    optimizer.step(closure)
    return {n: v.detach() for n, v in zip(names, torch.split(x, sizes))}


@pytest.mark.parametrize("categories", [[2] * 5, [2, 3, 4, 5, 3]])
def test_marginal_hessian_equals_autograd_for_binary_and_graded_items(categories):
    y, mask = _exam(categories)
    model = MarginalIRT(len(categories), categories, num_nodes=15).double()
    point = _point(model, y, mask)
    names = model.latent_sites
    sizes = [point[n].numel() for n in names]
    phi = torch.cat([point[n].reshape(-1) for n in names])

    def items(x):
        return model.item_parameters(dict(zip(names, torch.split(x, sizes))))

    def steps(x):
        log_p = model.category_log_probs(model.nodes.to(x.dtype), items(x))
        return model.cumulative_differences(log_p).flatten(-2).T

    expected = torch.autograd.functional.hessian(
        lambda x: model.log_marginal(y, mask, items(x)).sum(), phi)
    counts = model.response_counts(y, mask, torch.float64)
    exact = marginal_hessian(steps, phi, counts, model.log_weights, chunk_size=64,
                             node_dtype=torch.float64)
    assert torch.allclose(exact, expected, rtol=0, atol=1e-9 * expected.abs().max())
    fast = marginal_hessian(steps, phi, counts, model.log_weights, chunk_size=64)
    assert torch.allclose(fast, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_laplace_guide_matches_pyro_laplace_approximation():
    categories = [2, 2, 3, 4]
    y, mask = _exam(categories, n=200)
    pyro.clear_param_store()
    model = MarginalIRT(len(categories), categories, num_nodes=11).double()
    point = _mode(model, y, mask)
    args, kwargs = (y[:2], mask[:2]), {"size": len(y), "subsample": torch.arange(2)}
    reference = AutoLaplaceApproximation(model, init_loc_fn=init_to_value(values=point))
    reference(*args, **kwargs)
    reference = reference.laplace_approximation(y, mask)
    ours = laplace_guide(model, point, y, mask, args, kwargs, chunk_size=50)
    assert torch.allclose(ours.loc.double(), reference.loc.double(), atol=1e-6)

    def cov(g):
        tril = (g.scale[:, None] * g.scale_tril).double()
        return tril @ tril.T

    assert torch.allclose(cov(ours), cov(reference), rtol=1e-3, atol=1e-7)
    draws = ours.get_posterior().sample((2,))
    assert draws.shape == (2, reference.latent_dim)
