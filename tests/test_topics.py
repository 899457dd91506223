"""Topic models: ProdLDA / neural LDA on the shared engine, corpora, metrics, CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from pyro import poutine

import ppl_vae
from ppl_vae import SetupError, fit, log_likelihood
from ppl_vae.batching import TensorBatches
from ppl_vae.cli.main import main as cli
from ppl_vae.data.topics import CorpusWarning, load_octis, read_documents, sparse_counts
from ppl_vae.models.lda import build_lda
from ppl_vae.models.prodlda import DocumentCounts, build_prodlda, laplace_prior
from ppl_vae.models.topics import NearDuplicateTopics
from ppl_vae.topic_metrics import (
    diversity,
    log_multinomial_coefficient,
    npmi_per_topic,
    perplexity,
)

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")

WORDS = [f"w{i}" for i in range(30)]  # 3 planted topics of 10 words each


def planted_corpus(n=240, length=30, k=3, seed=0):
    """Documents mixing k disjoint word blocks; returns (counts (n, V), token lists)."""
    g = torch.Generator().manual_seed(seed)
    block = len(WORDS) // k
    theta = torch.distributions.Dirichlet(torch.full((k,), 0.2)).sample((n,))
    texts = []
    for t in theta:
        topics = torch.multinomial(t, length, replacement=True, generator=g)
        words = topics * block + torch.randint(0, block, (length,), generator=g)
        texts.append([WORDS[i] for i in words.tolist()])
    counts = torch.zeros(n, len(WORDS))
    for d, text in enumerate(texts):
        for w in text:
            counts[d, int(w[1:])] += 1
    return counts, texts


def recovered_blocks(topic_word: torch.Tensor, k=3) -> int:
    """How many planted blocks are the exact top-8 set of some learned topic."""
    block = len(WORDS) // k
    tops = [set(row) for row in topic_word.topk(block, -1).indices.tolist()]
    return sum(set(range(b * block, (b + 1) * block)) in tops for b in range(k))


def test_laplace_prior_matches_the_formula():
    k = 5
    loc, scale = laplace_prior(torch.ones(k))
    assert torch.allclose(loc, torch.zeros(k))
    assert torch.allclose(scale**2, torch.full((k,), 1 - 1 / k))  # alpha = 1: 1 - 1/K
    alpha = torch.tensor([0.5, 1.0, 2.0])
    loc, scale = laplace_prior(alpha)
    # by hand: mu_k = log a_k - mean log a; var_k = (1/a_k)(1 - 2/K) + sum(1/a)/K^2
    assert torch.allclose(loc, torch.tensor([-math.log(2), 0.0, math.log(2)]), atol=1e-6)
    assert torch.allclose(scale**2, torch.tensor([2 / 3 + 3.5 / 9, 1 / 3 + 3.5 / 9,
                                                  1 / 6 + 3.5 / 9]), atol=1e-6)


@pytest.mark.parametrize("builder,prior,alpha,lr", [(build_prodlda, "laplace", 1.0, 2e-2),
                                                    (build_lda, "laplace", 1.0, 2e-2),
                                                    (build_lda, "dirichlet", 0.5, 5e-2)])
def test_topic_models_learn_planted_topics_from_sparse_counts(builder, prior, alpha, lr):
    counts, _ = planted_corpus(n=180)  # theta ~ Dirichlet(0.2): sparse mixtures
    torch.manual_seed(0)
    model, guide = builder(len(WORDS), 3, hidden=32, prior=prior, alpha=alpha)
    history = fit(model, guide, counts.to_sparse_csr(), epochs=20, batch_size=60, lr=lr,
                  objective="meanfield", progress=False, seed=0)
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 2  # nats per document
    assert recovered_blocks(model.topic_word()) >= 2


def test_bounded_encoder_variance_learns_planted_topics_and_stays_within_its_bound():
    """Each document its own log-variance, within [-c, c] even for inputs far from the
    training ones (no batch norm pins its mean at 0 over a minibatch), and ProdLDA with it
    recovers planted topics."""
    from ppl_vae.nn import DocumentEncoder

    counts, _ = planted_corpus(n=180)
    torch.manual_seed(0)
    model, guide = build_prodlda(len(WORDS), 3, hidden=32, encoder_variance="bounded")
    encoder = guide.encoder
    assert encoder.variance == "bounded" and not hasattr(encoder, "bn2")
    history = fit(model, guide, counts.to_sparse_csr(), epochs=20, batch_size=60, lr=2e-2,
                  objective="meanfield", progress=False, seed=0)
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 2
    assert recovered_blocks(model.topic_word()) >= 2
    with torch.no_grad():
        encoder.fc2.bias.fill_(-50.0)  # far below the bound: clipped smoothly at -c
        _, scale = encoder(1000 * counts[:8])
    log_var = 2 * scale.log()
    assert (log_var >= -3.0 - 1e-4).all() and (log_var <= 3.0).all()
    assert log_var.mean() < -2.5  # not standardized over the batch, as batch norm would do
    encoder.train()
    _, lone = encoder(counts[:1])  # one document in training mode: no batch statistics
    assert lone.shape == (1, 3)
    with pytest.raises(ValueError, match="unknown variance 'wide'"):
        DocumentEncoder(len(WORDS), 3, variance="wide")
    with pytest.raises(ValueError, match="max_log_variance must be > 0"):
        DocumentEncoder(len(WORDS), 3, variance="bounded", max_log_variance=0)


def test_document_counts_score_and_sample_each_documents_own_length():
    """Every row is Multinomial(N_i, softmax(logits_i)) with its own N_i: log-densities equal
    torch's Multinomial row by row; samples keep each row's length and have mean N_i p_i."""
    import pyro.distributions as dist

    torch.manual_seed(0)
    logits = torch.randn(4, 7)
    lengths = [3, 10, 1, 25]
    x = torch.stack([dist.Multinomial(n, logits=logits[i]).sample()
                     for i, n in enumerate(lengths)])
    counts = DocumentCounts(logits + 5.0, x.sum(-1))  # unnormalized logits are fine
    expected = torch.stack([dist.Multinomial(n, logits=logits[i]).log_prob(x[i])
                            for i, n in enumerate(lengths)])
    torch.testing.assert_close(counts.log_prob(x), expected)
    draws = counts.sample((4000,))
    assert draws.shape == (4000, 4, 7)
    assert torch.equal(draws.sum(-1), torch.tensor(lengths).float().expand(4000, 4))
    torch.testing.assert_close(draws.mean(0), counts.mean, atol=0.25, rtol=0.05)
    with pytest.raises(ValueError, match="needs their lengths"):
        DocumentCounts(logits).sample()


def test_dirichlet_guide_is_reparameterized_and_on_the_simplex():
    counts, _ = planted_corpus(n=20)
    model, guide = build_lda(len(WORDS), 3, hidden=16, prior="dirichlet")
    q = guide.distribution(counts)
    assert q.has_rsample and q.batch_shape == (20,) and q.event_shape == (3,)
    theta = q.rsample()
    assert torch.allclose(theta.sum(-1), torch.ones(20), atol=1e-5)
    theta.sum().backward()  # gradients reach the encoder through the sample
    assert guide.encoder.fc1.weight.grad is not None


def test_sparse_minibatches_are_densified_rows():
    dense = torch.tensor([[0, 2, 0, 1], [0, 0, 0, 0], [3, 0, 0, 0], [1, 1, 1, 1.0]])
    batches = TensorBatches(dense.to_sparse_csr(), batch_size=3)
    seen = []
    for batch in batches:
        assert batch.args[0].layout == torch.strided
        assert torch.equal(batch.args[0], dense[batch.subsample])
        seen += batch.subsample.tolist()
    assert sorted(seen) == [0, 1, 2, 3]
    bad = dense.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"data\[0\].*NaN.*row 2"):
        TensorBatches(bad.to_sparse_csr(), batch_size=2)


def test_csr_minibatches_give_the_same_numbers_as_dense_rows():
    """sparse_batches: the rows reach the model as CSR; DocumentCounts' log-density, the
    encoder's output and its gradients, and a whole training run equal the dense path's."""
    from ppl_vae.nn import DocumentEncoder

    counts, _ = planted_corpus(n=50)
    counts[7] = 0  # an empty document
    rows = torch.tensor([7, 3, 40, 0])
    batches = TensorBatches(counts.to_sparse_csr(), batch_size=4, sparse_rows=True)
    sparse = batches.take(rows).args[0]
    assert sparse.layout == torch.sparse_csr and torch.equal(sparse.to_dense(), counts[rows])

    logits = torch.randn(3, 4, len(WORDS))  # 3 particles of 4 documents
    d = DocumentCounts(logits)
    torch.testing.assert_close(d.log_prob(sparse), d.log_prob(counts[rows]))
    with pytest.raises(ValueError, match="non-negative integers"):
        DocumentCounts(logits, validate_args=True).log_prob((counts[rows] * 0.5)
                                                            .to_sparse_csr())

    torch.manual_seed(0)
    encoder = DocumentEncoder(len(WORDS), 3, hidden=8).eval()
    outs = []
    for x in (counts[rows], sparse):
        encoder.zero_grad()
        loc, scale = encoder(x)
        (loc.square().sum() + scale.sum()).backward()
        outs.append((loc, scale, encoder.body[0].weight.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)

    import pyro
    from pyro.infer import TraceMeanField_ELBO

    losses, grads = [], []
    for x in (counts[:16], counts[:16].to_sparse_csr()):  # one SVI loss and its gradients
        torch.manual_seed(0)
        pyro.clear_param_store()
        model, guide = build_prodlda(len(WORDS), 3, hidden=16)
        torch.manual_seed(1)
        loss = TraceMeanField_ELBO().differentiable_loss(model.model, guide, x)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in (*model.parameters(),
                                                             *guide.parameters())]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-5)

    histories = []  # whole runs agree up to float noise (Adam amplifies it a little)
    for sparse_batches in (False, True):
        torch.manual_seed(0)
        model, guide = build_prodlda(len(WORDS), 3, hidden=16)
        histories.append(fit(model, guide, counts.to_sparse_csr(), val_data=counts[:20]
                             .to_sparse_csr(), epochs=3, batch_size=16, lr=1e-2,
                             objective="meanfield", sparse_batches=sparse_batches,
                             progress=False, seed=0))
    for key in ("train_elbo", "val_elbo"):
        assert histories[0][key] == pytest.approx(histories[1][key], rel=3e-3)


def test_default_batch_size_follows_the_corpus(tmp_path):
    """About 75 minibatches an epoch: batch 64 up to ~7,000 training documents, then the
    nearest power of two to N / 75 (at most 1024), the learning rate scaled by sqrt(batch/64)."""
    from ppl_vae.family import family_of
    from ppl_vae.models.topics import batch_settings

    family = family_of("prodlda")
    small = write_octis(tmp_path / "small", octis_lines(n=60))
    spec = family.make_spec("prodlda", corpus=str(small), topics=3)
    assert batch_settings(spec) == {"batch_size": 64, "lr": 0.01}
    assert family.fit_settings(spec)["sparse_batches"] is True
    big = write_octis(tmp_path / "big", octis_lines(n=60) * 600)  # 25,200 training lines
    settings = batch_settings(family.make_spec("prodlda", corpus=str(big), topics=3))
    assert settings == {"batch_size": 256, "lr": 0.02}
    # a batch size given without a learning rate gets its own rate; a given rate stays
    assert family.with_overrides(spec, {"batch_size": 256})["lr"] == 0.02
    assert family.with_overrides(spec, {"batch_size": 256, "lr": 0.1})["lr"] == 0.1
    assert family.with_overrides(spec, {"epochs": 3})["lr"] == 0.01


def gensim_npmi(topics, texts):
    gensim = pytest.importorskip("gensim")
    from gensim.models.coherencemodel import CoherenceModel
    dictionary = gensim.corpora.Dictionary(texts)
    cm = CoherenceModel(topics=topics, texts=texts, dictionary=dictionary,
                        coherence="c_npmi", topn=10, processes=1)
    return np.array(cm.get_coherence_per_topic())


def test_sparse_counts_stay_sparse_on_cpu_and_are_densified_on_a_gpu_when_small():
    from ppl_vae.batching import keeps_sparse

    small = sparse_counts([np.array([0, 2, 2])], vocab_size=5)
    assert keeps_sparse(small, torch.device("cpu"))
    assert not keeps_sparse(small, torch.device("cuda"))  # a decision only: no GPU needed
    huge = torch.sparse_csr_tensor(torch.zeros(2 * 10**5 + 1, dtype=torch.int64),
                                   torch.zeros(0, dtype=torch.int64), torch.zeros(0),
                                   size=(2 * 10**5, 3 * 10**3))      # 2.4 GB dense
    assert keeps_sparse(huge, torch.device("cuda"))


def test_npmi_equals_gensim_c_npmi():
    _, texts = planted_corpus(n=40, length=25)
    texts = [t[: 3 + i % 20] for i, t in enumerate(texts)]  # short and long documents
    texts.append(["w0", "w1", "w0"] + ["w9"] * 10 + ["w0", "w1"])  # word repeats at the edge
    texts.append([])
    topics = [WORDS[0:10], WORDS[5:15], WORDS[12:22], [WORDS[i] for i in (0, 9, 17, 3, 22)]]
    ours = npmi_per_topic(topics, texts)
    assert np.allclose(ours, gensim_npmi(topics, texts), rtol=0, atol=1e-12)
    # a planted topic is more coherent than a topic mixing the blocks
    assert ours[0] > ours[1] or ours[2] > ours[1]


def test_diversity():
    assert diversity([["a", "b"], ["c", "d"]], topk=2) == 1.0
    assert diversity([["a", "b"], ["a", "b"]], topk=2) == 0.5
    with pytest.raises(ValueError, match="25 words"):
        diversity([["a"]], topk=25)


def test_near_duplicate_topics_are_found_and_named_in_the_report():
    """Topics sharing more than half of their top 25 words are listed (most shared first),
    each topic points at its nearest copy, and the report warns with the topics' numbers."""
    from ppl_vae.models.topics import near_copies
    from ppl_vae.topic_metrics import near_duplicates, topic_quality

    vocabulary = [f"v{i}" for i in range(200)]
    weights = torch.zeros(4, 200)
    for k, start in enumerate([0, 50, 10, 100]):  # topic 2 shares 15 of topic 0's 25 words
        weights[k, start:start + 25] = torch.linspace(2, 1, 25)
    words = [[vocabulary[i] for i in row] for row in weights.topk(25, -1).indices.tolist()]
    assert near_duplicates(words) == [(0, 2, 15)]
    assert near_duplicates(words, shared=16) == []
    assert near_copies([(0, 2, 15), (1, 2, 20)], 4) == [2, 2, 1, None]
    texts = [vocabulary[i:i + 30] for i in range(0, 170, 5)]
    assert topic_quality(weights, vocabulary, texts)["near_duplicates"] == [[0, 2, 15]]
    assert "near_duplicates" not in topic_quality(weights[:, :60], vocabulary[:60], texts)


def test_co_use_is_the_correlation_of_two_topics_proportions_over_documents():
    """Copies used by the same documents correlate near 1, alternatives negatively; a topic
    whose proportion never varies gives NaN, not an error."""
    from ppl_vae.topic_metrics import co_use

    g = torch.Generator().manual_seed(0)
    theta = torch.distributions.Dirichlet(torch.ones(5)).sample((400,))
    theta[:, 1] = theta[:, 0] + 0.01 * torch.rand(400, generator=g)   # used with topic 0
    theta[:, 3] = 1 - theta[:, 2]                                     # instead of topic 2
    theta[:, 4] = 0.2
    together, instead, flat = co_use(theta, [(0, 1, 20), (2, 3, 14), (0, 4, 13)])
    assert together == pytest.approx(float(np.corrcoef(theta[:, 0], theta[:, 1])[0, 1]))
    assert together > 0.99 and instead == pytest.approx(-1.0) and math.isnan(flat)


def near_copy_run(tmp_path):
    """A 1-epoch prodlda run whose topic 2 is set to a near-copy of topic 0."""
    g = torch.Generator().manual_seed(0)
    vocabulary = [f"v{i}" for i in range(120)]
    lines = [" ".join(vocabulary[i] for i in torch.randint(0, 120, (20,), generator=g))
             + f"\t{split}\t0" for split in ["train"] * 40 + ["val"] * 10 + ["test"] * 10]
    folder = write_octis(tmp_path / "corpus", lines, vocabulary=vocabulary)
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "4", "--hidden", "8",
                "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    run = ppl_vae.load_run(out)
    beta = torch.zeros(120, 4)  # (V, K): topic 2 a near-copy of topic 0
    for k, start in enumerate([0, 40, 5, 80]):
        beta[start:start + 25, k] = torch.linspace(2, 1, 25)
    with torch.no_grad():
        run.model.beta.weight.copy_(beta)
    return run, out


def test_the_report_names_near_copies_in_topics_csv_and_a_warning(tmp_path):
    run, out = near_copy_run(tmp_path)
    with pytest.warns(NearDuplicateTopics, match=r"2 of 4 topics share more than half .*"
                      r"\(topics 0, 2; column near_copy_of of .*topics.csv; median correlation of "
                      r"a pair's proportions over the training documents -?[01]\.\d\d\).*--topics"):
        run.family.report(run)
    with open(out / "topics.csv") as f:
        copy_of = {int(r["topic"]): r["near_copy_of"] for r in csv.DictReader(f)}
    assert copy_of == {0: "2", 1: "", 2: "0", 3: ""}
    quality = json.loads((out / "topic_quality.json").read_text())
    assert quality["near_duplicates"] == [[0, 2, 20]]
    from ppl_vae.topic_metrics import co_use
    assert quality["near_duplicates_co_use"] == pytest.approx(
        co_use(run.family.train_theta(run), [(0, 2)]))


def test_the_near_copy_warning_does_not_blame_the_corpus_after_a_few_epochs(tmp_path):
    """Near-copies after 1 epoch may be an undertrained run's (neural LDA, 5 planted themes,
    K = 5: near-copies at 3 epochs, none at 30): the warning says how many epochs it saw
    and blames the corpus only as a possibility once training had time to separate topics."""
    run, _ = near_copy_run(tmp_path)
    assert len(run.history) == 1
    with pytest.warns(NearDuplicateTopics) as record:
        run.family.report(run)
    message = str(record[0].message)
    assert "after 1 training epoch: too few to tell" in message and "--epochs" in message
    assert "the corpus has fewer themes" not in message and "corpus may" not in message
    run.history = run.history * 30
    with pytest.warns(NearDuplicateTopics, match=r"after 30 training epochs: the corpus may "
                      r"have fewer themes than topics \(an undertrained run shows this too\); "
                      r"fewer topics \(--topics\)"):
        run.family.report(run)


def test_perplexity_is_an_upper_bound():
    counts, _ = planted_corpus(n=60)
    model, guide = build_prodlda(len(WORDS), 3, hidden=16)
    fit(model, guide, counts, epochs=5, batch_size=30, lr=1e-2, progress=False)
    torch.manual_seed(0)
    bound = perplexity(model, guide, counts.to_sparse_csr(), num_particles=20)
    log_p = log_likelihood(model, guide, counts, num_samples=200, per_example=True)
    tighter = math.exp(-float((log_p - log_multinomial_coefficient(counts)).sum())
                       / float(counts.sum()))
    assert tighter <= bound < len(WORDS) * 1.5  # not worse than uniform by much
    assert bound > 1


def write_octis(folder, lines, vocabulary=WORDS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocabulary.txt").write_text("\n".join(vocabulary) + "\n")
    (folder / "corpus.tsv").write_text("\n".join(lines) + "\n")
    return folder


def octis_lines(n=120, seed=0):
    _, texts = planted_corpus(n=n, length=20, seed=seed)
    splits = ["train"] * (n * 7 // 10) + ["val"] * (n * 15 // 100)
    splits += ["test"] * (n - len(splits))
    return [f"{' '.join(t)}\t{s}\t0" for t, s in zip(texts, splits)]


def test_octis_reader_counts_splits_and_validates(tmp_path):
    corpus = load_octis(write_octis(tmp_path / "ok", octis_lines()))
    assert [corpus.counts[s].shape[0] for s in ("train", "val", "test")] == [84, 18, 18]
    assert corpus.counts["train"].layout == torch.sparse_csr
    assert float(corpus.counts["train"].to_dense()[0].sum()) == 20

    lines = octis_lines()
    lines[3] = "w1 w2\tdev\t0"
    with pytest.raises(ValueError, match=r"corpus.tsv line 4: field 'split' is 'dev'"):
        load_octis(write_octis(tmp_path / "split", lines))
    lines[3] = "w1 w2 no tab"
    with pytest.raises(ValueError, match=r"line 4: expected 'tokens<TAB>split"):
        load_octis(write_octis(tmp_path / "tab", lines))
    with pytest.raises(ValueError, match=r"vocabulary.txt line 3: word 'w0' repeats line 1"):
        load_octis(write_octis(tmp_path / "dup", octis_lines(), ["w0", "w1", "w0"]))

    lines = octis_lines()
    lines[0] = "w1 zzz w2 yyy\ttrain\t0"
    lines[1] = "qqq\ttrain\t0"
    with pytest.warns(CorpusWarning) as record:
        corpus = load_octis(write_octis(tmp_path / "oov", lines))
    messages = " | ".join(str(w.message) for w in record)
    assert "3 out-of-vocabulary tokens in 2 documents" in messages
    assert "1 empty documents" in messages and "lines 2" in messages
    assert corpus.counts["train"].shape[0] == 83


def test_new_documents_vocabulary_mismatch_and_empty(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text("alpha beta gamma\ndelta\n")
    with pytest.raises(ValueError, match="vocabulary mismatch: none of its 4 tokens"):
        read_documents(docs, WORDS)
    docs.write_text("w1 w1 w2\n\nunknown\n")
    with pytest.warns(CorpusWarning, match="1 documents have no in-vocabulary word"):
        counts, empty = read_documents(docs, WORDS)
    assert counts.shape == (2, len(WORDS)) and empty == 1 and counts.to_dense()[0, 1] == 2


def punctuated_text(tmp_path, n=60):
    """A plain-text corpus written like prose: capitals, commas and full stops on the planted
    words; returns (file, its documents' tokens as CountVectorizer gives them)."""
    _, texts = planted_corpus(n=n, length=15)
    rng = np.random.default_rng(0)
    marks = ["", "", ",", ".", ";"]
    lines = [" ".join((w.upper() if rng.random() < 0.2 else w) + marks[rng.integers(5)]
                      for w in t) for t in texts]
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, texts


def transform_rows(run, docs, out):
    """Transform ``docs`` with every warning recorded: (doc column, theta (D, K), warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run.family.transform(run, docs=docs, out=out)
    with open(out) as f:
        rows = list(csv.reader(f))[1:]
    theta = np.array([[float(v) for v in r[1:]] for r in rows])
    return [int(r[0]) for r in rows], theta, [w for w in caught
                                              if issubclass(w.category, CorpusWarning)]


def test_transform_tokenizes_new_plain_text_as_training_did(tmp_path):
    """A run trained on a text file (CountVectorizer: lower-cased, punctuation stripped)
    reads new documents the same way: its own training file loses no token, and documents
    written like it ("W1, w2.") are accepted -- also for a run stored before tokenizer.json
    (told from its spec). A str.lower().split() reader lost the words with punctuation."""
    pytest.importorskip("sklearn")
    path, texts = punctuated_text(tmp_path)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["train", "prodlda", "--corpus", str(path), "--topics", "3", "--hidden",
                    "8", "--epochs", "1", "--stop-words", "none", "--min-df", "1",
                    "--out", str(out), "--no-progress"]) == 0
    stored = json.loads((out / "tokenizer.json").read_text())
    assert stored["kind"] == "countvectorizer" and stored["lowercase"] is True
    run = ppl_vae.load_run(out)
    new = tmp_path / "new.txt"
    new.write_text("W1, w2, w3.\nw21; W22, w23.\n")
    for stored_tokenizer in (True, False):  # False: a run from before tokenizer.json
        if not stored_tokenizer:
            (out / "tokenizer.json").unlink()
        lines, theta, dropped = transform_rows(run, path, tmp_path / "theta.csv")
        assert dropped == [] and lines == list(range(1, len(texts) + 1))
        counts, _ = read_documents(path, WORDS, run.family.tokenizer(run))
        assert float(counts.to_dense().sum()) == sum(map(len, texts))  # every token kept
        lines, theta, dropped = transform_rows(run, new, tmp_path / "theta.csv")
        assert dropped == [] and lines == [1, 2] and theta.shape == (2, 3)


def test_transform_keeps_the_case_of_an_octis_corpus(tmp_path):
    """OCTIS text is preprocessed: training splits it at whitespace and keeps its case, so
    transform does too; the run's own corpus.tsv (text before the tab) is read whole. A
    lower-casing reader found none of the capitalised words ("vocabulary mismatch")."""
    vocabulary = [w.upper() if i % 2 else w for i, w in enumerate(WORDS)]
    lines = [" ".join(vocabulary[WORDS.index(w)] for w in line.split("\t")[0].split())
             + "\t" + line.split("\t", 1)[1] for line in octis_lines(n=60)]
    folder = write_octis(tmp_path / "corpus", lines, vocabulary=vocabulary)
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "tokenizer.json").read_text())["kind"] == "whitespace"
    run = ppl_vae.load_run(out)
    for stored_tokenizer in (True, False):  # False: a run from before tokenizer.json
        if not stored_tokenizer:
            (out / "tokenizer.json").unlink()
        numbers, theta, dropped = transform_rows(run, folder / "corpus.tsv",
                                                 tmp_path / "theta.csv")
        assert dropped == [] and numbers == list(range(1, 61)) and theta.shape == (60, 3)
        counts, _ = read_documents(folder / "corpus.tsv", vocabulary,
                                   run.family.tokenizer(run))
        assert float(counts.to_dense().sum()) == 60 * 20


def test_transform_doc_numbers_are_the_files_line_numbers(tmp_path):
    """Documents are lines separated by \\n (\\r\\n, \\r), the UTF-8 byte-order mark dropped:
    U+2028, \\x0c and \\x85 inside a document do not end it, a BOM before a blank first line
    does not shift the numbers, and the doc column names the lines that hold documents."""
    folder = write_octis(tmp_path / "corpus", octis_lines(n=60))
    out = tmp_path / "run"
    assert cli(["train", "lda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    run = ppl_vae.load_run(out)
    docs = tmp_path / "docs.txt"
    docs.write_text("w0 w1\u2028w2 w3\n\nw10\x0cw11 w12\n\x85\nw20 w21\x85w22\n",
                    encoding="utf-8")
    numbers, theta, _ = transform_rows(run, docs, tmp_path / "theta.csv")
    assert numbers == [1, 3, 5] and theta.shape == (3, 3)
    counts, _ = read_documents(docs, WORDS, run.family.tokenizer(run))
    assert counts.to_dense().sum(-1).tolist() == [4, 3, 3]  # nothing cut off at U+2028 ...
    np.testing.assert_allclose(theta, run.family.theta(run, counts), atol=1e-5)
    docs.write_text("\nw0 w1\nw20 w21\n", encoding="utf-8-sig")
    assert transform_rows(run, docs, tmp_path / "theta.csv")[0] == [2, 3]


def test_check_loglik_per_word_leaves_out_the_multinomial_coefficient(tmp_path):
    """`check`'s heldout_loglik_per_word is the word sequence's log-likelihood, like
    evaluate's perplexity: no model beats the saturated one (each document's own word
    frequencies), and exp(-it) is heldout_perplexity. With the multinomial coefficient it
    was above that bound (-1.47 against -2.18 nats per word)."""
    lines = octis_lines(n=100)
    folder = write_octis(tmp_path / "corpus", lines)
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--epochs", "2", "--out", str(out), "--no-progress"]) == 0
    run = ppl_vae.load_run(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run.family.check(run, samples=20, khat_samples=20)
    test = load_octis(folder).split("test").to_dense()[:50]
    frequencies = test / test.sum(-1, keepdim=True)
    saturated = float(torch.xlogy(test, frequencies).sum() / test.sum())
    assert result["heldout_documents"] == test.shape[0]
    assert result["heldout_loglik_per_word"] <= saturated
    assert result["heldout_loglik_per_word"] > -math.log(len(WORDS)) - 1  # not absurd
    assert result["heldout_perplexity"] == pytest.approx(
        math.exp(-result["heldout_loglik_per_word"]))
    stored = json.loads((out / "check.json").read_text())
    assert stored["heldout_loglik_per_word"] == pytest.approx(result["heldout_loglik_per_word"])


def test_sparse_counts_roundtrip():
    ids = [np.array([0, 2, 2]), np.array([], dtype=np.int64), np.array([1])]
    dense = sparse_counts(ids, 3).to_dense()
    assert dense.tolist() == [[1, 0, 2], [0, 0, 0], [0, 1, 0]]


def test_cli_train_evaluate_transform(tmp_path, capsys):
    folder = write_octis(tmp_path / "corpus", octis_lines(n=60))
    run = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--epochs", "2",
                "--hidden", "16", "--batch-size", "32", "--out", str(run), "--no-progress"]) == 0
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "topics.csv", "topics.png",
                 "vocabulary.txt"):
        assert (run / name).exists(), name
    with open(run / "topics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["topic", "rank", "word", "weight", "npmi", "usage", "documents",
                            "near_copy_of"]
    assert {r["topic"] for r in rows} == {"0", "1", "2"} and rows[0]["word"] in WORDS
    capsys.readouterr()
    cli(["evaluate", str(run)])
    out = capsys.readouterr().out.splitlines()
    values = {line.split(": ")[0]: line.split(": ")[1] for line in out}
    assert -1 <= float(values["npmi"]) <= 1
    assert 0 < float(values["diversity"]) <= 1
    assert 1 < float(values["perplexity"]) < 100
    docs = tmp_path / "new.txt"
    docs.write_text("w0 w1 w2 w3\nw20 w21\n")
    theta_csv = tmp_path / "theta.csv"
    cli(["transform", str(run), "--docs", str(docs), "--out", str(theta_csv)])
    with open(theta_csv) as f:
        theta = list(csv.reader(f))
    assert theta[0] == ["doc", "topic_0", "topic_1", "topic_2"] and len(theta) == 3
    assert abs(sum(float(v) for v in theta[1][1:]) - 1) < 1e-4
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        docs.write_text("nothing known here\n")
        cli(["transform", str(run), "--docs", str(docs), "--out", str(theta_csv)])


def test_cli_trains_lda_on_plain_text(tmp_path):
    pytest.importorskip("sklearn")
    _, texts = planted_corpus(n=60, length=15)
    text = tmp_path / "docs.txt"
    text.write_text("\n".join(" ".join(t) for t in texts) + "\n\n")
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli(["train", "lda", "--corpus", str(text), "--topics", "3", "--epochs", "2",
             "--hidden", "8", "--prior", "dirichlet", "--stop-words", "none",
             "--out", str(run), "--no-progress"])
    vocabulary = (run / "vocabulary.txt").read_text().split()
    assert sorted(vocabulary) == sorted(WORDS)
    config = json.loads((run / "config.json").read_text())
    spec = config["spec"]
    assert spec["prior"] == "dirichlet" and spec["alpha"] == 0.1  # sparse by default
    assert spec["vocab_size"] == len(WORDS) and config["family"] == "topics"


def metrics_without_time(run):
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_the_same_seed_gives_the_same_run_from_the_cli_and_from_python(tmp_path):
    """Two CLI trainings with the same --seed, and ppl_vae.train with that seed, write
    bit-identical metrics (the seed fixes the initial weights too) and the same topics."""
    folder = write_octis(tmp_path / "corpus", octis_lines(n=60))
    argv = ["train", "lda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
            "--epochs", "3", "--seed", "3", "--no-progress", "--out"]
    assert cli(argv + [str(tmp_path / "a")]) == 0 and cli(argv + [str(tmp_path / "b")]) == 0
    ppl_vae.train("lda", tmp_path / "c", {"corpus": str(folder), "topics": 3, "hidden": 8,
                                          "split_seed": 3}, epochs=3, seed=3, progress=False)
    first = metrics_without_time(tmp_path / "a")
    assert len(first) == 3 and "val_elbo" in first[0]
    assert first == metrics_without_time(tmp_path / "b") == metrics_without_time(tmp_path / "c")
    topics = [(tmp_path / r / "topics.csv").read_text() for r in "ac"]
    assert topics[0] == topics[1]
    cli([a if a != "3" or argv[i - 1] != "--seed" else "4" for i, a in enumerate(argv)]
        + [str(tmp_path / "d")])
    assert metrics_without_time(tmp_path / "d") != first


def test_cli_without_flags_trains_with_the_family_defaults_and_python_gets_the_run(tmp_path):
    """`ppl-vae train prodlda` with no training flags = the family's fit defaults (AVITM:
    50 epochs, batch 64, lr 1e-2, meanfield); the run reloads in Python, where theta,
    evaluate and transform are the family's methods."""
    folder = write_octis(tmp_path / "corpus", octis_lines(n=60))
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    fit_settings = config["fit"]
    assert {k: fit_settings[k] for k in ("epochs", "batch_size", "lr", "objective")} == \
        {"epochs": 50, "batch_size": 64, "lr": 1e-2, "objective": "meanfield"}
    assert fit_settings["kl_sites"] == ["logtheta"] and fit_settings["patience"] == 10
    epochs = len(metrics_without_time(out))
    assert 11 <= epochs <= 50  # early stopping on the validation ELBO, at most 50 epochs
    quality = json.loads((out / "topic_quality.json").read_text())
    assert len(quality["npmi_per_topic"]) == 3 and 0 < quality["diversity_10"] <= 1

    run = ppl_vae.load_run(out)
    assert run.checkpoint.name == "best.pt" and run.name == "prodlda"
    corpus = load_octis(folder)
    theta = run.family.theta(run, corpus.split("test"))
    assert theta.shape == (corpus.split("test").shape[0], 3)
    assert torch.allclose(theta.sum(-1), torch.ones(len(theta)), atol=1e-5)
    # the data plate is "data", its ArviZ axis "document"
    trace = poutine.trace(run.model).get_trace(corpus.split("train").to_dense()[:4])
    assert [f.name for f in trace.nodes["counts"]["cond_indep_stack"]] == ["data"]
    assert run.family.dims["counts"] == ["document", "word"]

    docs = tmp_path / "new.txt"
    docs.write_text("w0 w1 w2 w3\n\nw20 w21\n")
    written = run.family.transform(run, docs=docs, out=tmp_path / "theta.csv")
    assert written["documents"] == 2
    with open(tmp_path / "theta.csv") as f:
        rows = list(csv.reader(f))
    counts, _ = read_documents(docs, WORDS)
    expected = run.family.theta(run, counts)
    assert [r[0] for r in rows[1:]] == ["1", "3"]  # line numbers of the documents
    assert np.allclose([[float(v) for v in r[1:]] for r in rows[1:]], expected, atol=1e-5)

    result = run.family.evaluate(run, limit=5)
    assert list(result)[:3] == ["npmi", "diversity", "perplexity"]
    assert result["test_documents"] == 5 and result["npmi"] == pytest.approx(quality["npmi"])

    # the corpus changed its words since training: an error naming both vocabularies
    write_octis(folder, octis_lines(n=60), vocabulary=WORDS[::-1])
    with pytest.raises(SetupError, match=r"vocabulary mismatch: .*corpus.vocabulary.txt "
                       r"now has 30 words, the run was trained on 30 .*run.vocabulary.txt"):
        cli(["evaluate", str(out)])


def test_bad_topic_settings_are_setup_errors_naming_the_field(tmp_path):
    folder = write_octis(tmp_path / "corpus", octis_lines(n=30))
    base = ["train", "prodlda", "--corpus", str(folder), "--out", str(tmp_path / "r")]
    with pytest.raises(SetupError, match=r"topics \(--topics\) must be >= 2, got 1"):
        cli(base + ["--topics", "1"])
    with pytest.raises(SetupError, match=r"alpha \(--alpha\) must be > 0, got -1"):
        cli(base + ["--alpha", "-1"])
    with pytest.raises(SetupError, match=r"beta_precision \(--beta-precision\) must be >= 0, "
                       r"got -2"):
        cli(base + ["--beta-precision", "-2"])
    with pytest.raises(SetupError, match=r"corpus \(--corpus\): .*missing"):
        cli(["train", "lda", "--corpus", str(tmp_path / "missing"), "--out",
             str(tmp_path / "r")])
    with pytest.raises(SetupError, match="need a corpus"):
        ppl_vae.train("prodlda", None, {"topics": 3})


# ---- issue 16: the background decoder, one answer per run, contextual embeddings --------

def test_log_frequencies_and_the_prior_on_beta_shrinks_the_topics():
    """b = log word shares (sparse or dense counts alike); the Normal prior on beta is in
    the training objective only and pulls the topics' weights towards 0."""
    from ppl_vae.models.prodlda import log_frequencies

    counts, _ = planted_corpus(n=120)
    shares = (counts.sum(0) + 1) / (counts.sum() + counts.shape[1])
    torch.testing.assert_close(log_frequencies(counts.to_sparse_csr()), shares.log())
    torch.testing.assert_close(log_frequencies(counts), shares.log())
    norms = {}
    for precision in (0.0, 100.0):
        torch.manual_seed(0)
        model, guide = build_prodlda(len(WORDS), 3, hidden=16, beta_precision=precision,
                                     background=log_frequencies(counts))
        fit(model, guide, counts.to_sparse_csr(), epochs=8, batch_size=60, lr=2e-2,
            objective="meanfield", progress=False, seed=0)
        norms[precision] = float(model.beta.weight.detach().norm())
        model.eval()  # held-out scores leave the prior out
        trace = poutine.trace(model).get_trace(counts[:5])
        assert "beta_prior" not in trace.nodes
        model.train()
        assert ("beta_prior" in poutine.trace(model).get_trace(counts[:5]).nodes) \
            == (precision > 0)
    assert norms[100.0] < 0.7 * norms[0.0]
    with pytest.raises(ValueError, match="beta_precision must be >= 0"):
        build_prodlda(len(WORDS), 3, beta_precision=-1)


def test_runs_written_before_issue_16_reload_with_the_batch_norm_decoder(tmp_path):
    folder = write_octis(tmp_path / "corpus", octis_lines(n=40))
    from ppl_vae.models.topics import TopicFamily

    family = TopicFamily()
    old = family.spec_from_json({"model": "prodlda", "corpus": str(folder), "topics": 3,
                                 "vocab_size": len(WORDS)})
    assert old.decoder_bn and hasattr(family.build(old)[0], "bn")
    new = family.make_spec("prodlda", corpus=str(folder), topics=3)
    model = family.build(new)[0]
    assert not new.decoder_bn and not hasattr(model, "bn")
    # the prior's precision unless given: with the bounded head (the default on long
    # texts) 3 at K = 20, scaled by (20/K)^(2/3); with the batch-normed head 10 (20/K)^2
    assert family.make_spec("prodlda", corpus=str(folder), topics=20).beta_precision == 3
    assert family.make_spec("prodlda", corpus=str(folder), topics=160).beta_precision \
        == pytest.approx(0.75)
    assert family.make_spec("prodlda", corpus=str(folder), topics=40,
                            encoder_variance="batchnorm").beta_precision == 2.5
    assert family.make_spec("prodlda", corpus=str(folder), topics=40,
                            beta_precision=0).beta_precision == 0
    assert model.beta_precision == pytest.approx(3 * (20 / 3) ** (2 / 3))
    # the background starts at the training split's log word frequencies
    corpus = load_octis(folder)
    from ppl_vae.models.prodlda import log_frequencies
    torch.testing.assert_close(model.background.detach(),
                               log_frequencies(corpus.counts["train"]))


def test_short_texts_get_their_own_prodlda_defaults(tmp_path):
    """Titles (under 15 tokens per training document): alpha 0.1 and beta_precision
    3 (20/K)^2; long documents keep alpha 1 and (bounded head) 3 (20/K)^(2/3); given values
    and LDA are untouched."""
    from ppl_vae.models.topics import TopicFamily, mean_document_length, topic_corpus

    family = TopicFamily()
    _, texts = planted_corpus(n=60, length=5)
    splits = ["train"] * 42 + ["val"] * 9 + ["test"] * 9
    titles = write_octis(tmp_path / "titles", [f"{' '.join(t)}\t{s}\t0"
                                               for t, s in zip(texts, splits)])
    spec = family.make_spec("prodlda", corpus=str(titles), topics=10)
    assert mean_document_length(topic_corpus(spec)) == pytest.approx(5)
    assert (spec.alpha, spec.beta_precision) == (0.1, pytest.approx(12.0))
    given = family.make_spec("prodlda", corpus=str(titles), topics=10, alpha=0.5,
                             beta_precision=3)
    assert (given.alpha, given.beta_precision) == (0.5, 3)
    assert family.make_spec("lda", corpus=str(titles), topics=10).alpha == 1.0
    documents = write_octis(tmp_path / "documents", octis_lines(n=60))  # 20 tokens each
    long = family.make_spec("prodlda", corpus=str(documents), topics=10)
    assert (long.alpha, long.beta_precision) == (1.0, pytest.approx(3 * 2 ** (2 / 3)))
    # a reloaded run keeps what it stored, readable corpus or not
    stored = family.spec_from_json({**dataclasses.asdict(spec), "corpus": str(tmp_path / "gone")})
    assert (stored.alpha, stored.beta_precision) == (0.1, pytest.approx(12.0))


def test_encoder_variance_defaults_reloads_and_kl_ramp(tmp_path):
    """ProdLDA on long texts gets the bounded encoder variance with the KL term ramped in over
    the warm-up epochs and a cosine learning rate; short texts, neural LDA, the Dirichlet
    prior and AVITM's decoder keep the batch norm; runs stored before the field existed
    reload with the batch norm (and their dropout on theta); no dropout on theta before the
    decoder with the bounded head; bad values are SetupErrors naming the field and flag; the
    flag reaches the stored spec."""
    from ppl_vae.models.topics import TopicFamily

    family = TopicFamily()
    documents = write_octis(tmp_path / "documents", octis_lines(n=60))  # 20 tokens each
    long = family.make_spec("prodlda", corpus=str(documents), topics=3)
    assert long.encoder_variance == "bounded"
    assert family.build(long)[1].encoder.variance == "bounded"
    # no dropout on theta before the decoder with the bounded head; the encoder keeps its own
    assert (long.theta_dropout, long.dropout) == (0.0, 0.2)
    model, guide = family.build(long)
    assert model.drop.p == 0.0 and guide.encoder.body[-1].p == 0.2
    settings = family.fit_settings(long)
    assert settings["kl_anneal_epochs"] == settings["warmup_epochs"] == 10
    assert settings["kl_sites"] == ("logtheta",) and settings["lr_schedule"] == "cosine"
    assert family.with_overrides(long, {"warmup_epochs": 4})["kl_anneal_epochs"] == 4
    assert family.with_overrides(long, {"epochs": 5})["kl_anneal_epochs"] == 4
    assert family.with_overrides(long, {"epochs": 1})["kl_anneal_epochs"] == 0
    assert family.with_overrides(long, {})["kl_anneal_epochs"] == 10
    assert family.with_overrides(long, {"warmup_epochs": 4, "kl_anneal_epochs": 2}
                                 )["kl_anneal_epochs"] == 2
    _, texts = planted_corpus(n=60, length=5)
    splits = ["train"] * 42 + ["val"] * 9 + ["test"] * 9
    titles = write_octis(tmp_path / "titles", [f"{' '.join(t)}\t{s}\t0"
                                               for t, s in zip(texts, splits)])
    for spec in (family.make_spec("prodlda", corpus=str(titles), topics=3),
                 family.make_spec("lda", corpus=str(documents), topics=3),
                 family.make_spec("prodlda", corpus=str(documents), topics=3,
                                  prior="dirichlet"),
                 family.make_spec("prodlda", corpus=str(documents), topics=3,
                                  decoder_bn=True)):
        assert spec.encoder_variance == "batchnorm"
        assert spec.theta_dropout == spec.dropout == 0.2
        assert not {"kl_anneal_epochs", "lr_schedule"} & set(family.fit_settings(spec))
    lda = family.make_spec("lda", corpus=str(documents), topics=3, encoder_variance="bounded")
    assert family.build(lda)[1].encoder.variance == "bounded"  # the flag reaches its guide
    given = family.make_spec("prodlda", corpus=str(documents), topics=3,
                             encoder_variance="batchnorm")
    assert given.encoder_variance == "batchnorm"
    assert hasattr(family.build(given)[1].encoder, "bn2")
    stored = {k: v for k, v in dataclasses.asdict(long).items()
              if k not in ("encoder_variance", "theta_dropout")}
    assert family.spec_from_json(stored).encoder_variance == "batchnorm"
    assert family.spec_from_json({**stored, "dropout": 0.3}).theta_dropout == 0.3
    with pytest.raises(SetupError, match=r"theta_dropout \(--theta-dropout\) must be in "
                       r"\[0, 1\), got 1.5"):
        family.make_spec("prodlda", corpus=str(documents), topics=3, theta_dropout=1.5)
    with pytest.raises(SetupError, match=r"encoder_variance \(--encoder-variance\) must be one "
                       r"of \('batchnorm', 'bounded'\), got 'wide'"):
        family.make_spec("prodlda", corpus=str(documents), topics=3, encoder_variance="wide")
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(documents), "--topics", "3", "--hidden",
                "8", "--epochs", "1", "--encoder-variance", "batchnorm", "--theta-dropout",
                "0.1", "--out", str(out), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["spec"]["encoder_variance"] == "batchnorm"
    assert config["spec"]["theta_dropout"] == 0.1


def test_train_report_and_evaluate_give_one_answer(tmp_path, capsys):
    """topics.csv, topic_quality.json and `ppl-vae evaluate` score the same topics: those of
    the best validation epoch (best.pt), not the last one; topics.csv carries each topic's
    NPMI and usage."""
    folder = write_octis(tmp_path / "corpus", octis_lines(n=90))
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--epochs", "12", "--lr", "0.3", "--patience", "4", "--seed", "0",
                "--warmup-epochs", "0",
                "--beta-precision", "10",
                "--out", str(out), "--no-progress"]) == 0
    history = metrics_without_time(out)
    best = max(history, key=lambda r: float(r["val_elbo"]))
    assert int(best["epoch"]) < len(history)  # the last epoch is not the best here
    with open(out / "topics.csv") as f:
        rows = list(csv.DictReader(f))
    per_topic = {}
    for row in rows:
        per_topic[int(row["topic"])] = (float(row["npmi"]), float(row["usage"]),
                                        int(row["documents"]))
    quality = json.loads((out / "topic_quality.json").read_text())
    assert [v[0] for _, v in sorted(per_topic.items())] == pytest.approx(
        quality["npmi_per_topic"], abs=1e-5)
    assert sum(v[1] for v in per_topic.values()) == pytest.approx(1, abs=1e-4)
    assert sum(v[2] for v in per_topic.values()) == load_octis(folder).split("train").shape[0]

    capsys.readouterr()
    assert cli(["evaluate", str(out)]) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(printed["npmi"]) == pytest.approx(quality["npmi"], abs=1e-6)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["npmi_per_topic"] == pytest.approx(quality["npmi_per_topic"])

    # and both are the best epoch's: the last epoch's topics (checkpoint.pt) differ
    run = ppl_vae.load_run(out)
    assert run.checkpoint.name == "best.pt"
    last = torch.load(out / "checkpoint.pt", weights_only=True)["model"]["beta.weight"].t()
    assert not torch.allclose(last, run.model.topic_word())

    # without a run folder, ppl_vae.train gives the same best epoch's model (kept in memory)
    in_memory = ppl_vae.train("prodlda", None, {"corpus": str(folder), "topics": 3,
                                                "hidden": 8, "beta_precision": 10},
                              epochs=12, lr=0.3, patience=4, seed=0, warmup_epochs=0,
                              progress=False)
    torch.testing.assert_close(in_memory.model.topic_word(), run.model.topic_word())


def embeddings_corpus(tmp_path, n=60, dim=5):
    folder = write_octis(tmp_path / "corpus", octis_lines(n=n))
    matrix = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    np.save(tmp_path / "emb.npy", matrix)
    return folder, matrix


def test_contextual_embeddings_feed_the_encoder_and_the_run_reloads(tmp_path):
    folder, matrix = embeddings_corpus(tmp_path)
    out = tmp_path / "run"
    assert cli(["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--hidden", "8",
                "--epochs", "3", "--embeddings", str(tmp_path / "emb.npy"), "--out", str(out),
                "--no-progress"]) == 0
    spec = json.loads((out / "config.json").read_text())["spec"]
    assert spec["embedding_dim"] == 5 and spec["embeddings"].endswith("emb.npy")
    run = ppl_vae.load_run(out)
    assert run.guide.encoder.body[0].in_features == len(WORDS) + 5
    result = run.family.evaluate(run)
    assert -1 <= result["npmi"] <= 1 and result["perplexity"] > 1

    corpus = load_octis(folder)
    test = corpus.split("test")
    rows = corpus.documents["test"]
    theta = run.family.theta(run, test, embeddings=torch.as_tensor(matrix[rows]))
    assert theta.shape == (test.shape[0], 3)
    other = run.family.theta(run, test, embeddings=torch.as_tensor(matrix[rows] + 3.0))
    assert not torch.allclose(theta, other)  # the encoder reads the embeddings

    docs = tmp_path / "new.txt"
    docs.write_text("w0 w1 w2 w3\n\nw20 w21\n")
    with pytest.raises(SetupError, match=r"trained with contextual document embeddings .*"
                       r"needs the new documents' embeddings too"):
        run.family.transform(run, docs=docs, out=tmp_path / "theta.csv")
    np.save(tmp_path / "new.npy", matrix[:2])
    written = run.family.transform(run, docs=docs, out=tmp_path / "theta.csv",
                                   embeddings=tmp_path / "new.npy")
    assert written["documents"] == 2
    np.save(tmp_path / "three.npy", matrix[:3])
    with pytest.raises(ValueError, match=r"3 rows of embeddings, but .*new.txt .* has 2 "
                       r"documents"):
        run.family.transform(run, docs=docs, out=tmp_path / "theta.csv",
                             embeddings=tmp_path / "three.npy")


def test_bad_embeddings_are_refused_before_training(tmp_path):
    folder, matrix = embeddings_corpus(tmp_path)
    base = ["train", "prodlda", "--corpus", str(folder), "--topics", "3", "--out",
            str(tmp_path / "r"), "--no-progress", "--embeddings"]
    np.save(tmp_path / "short.npy", matrix[:50])
    with pytest.raises(SetupError, match=r"short.npy: 50 rows of embeddings, but the corpus "
                       r".* has 60 documents"):
        cli(base + [str(tmp_path / "short.npy")])
    bad = matrix.copy()
    bad[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(SetupError, match=r"1 rows of embeddings hold NaN or infinite values, "
                       r"first row 7"):
        cli(base + [str(tmp_path / "nan.npy")])
    (tmp_path / "text.npy").write_text("not numpy")
    with pytest.raises(SetupError, match=r"text.npy: not a NumPy .npy array"):
        cli(base + [str(tmp_path / "text.npy")])
    np.save(tmp_path / "flat.npy", matrix[:, 0])
    with pytest.raises(SetupError, match=r"2-D matrix \(documents, E\), got shape \(60,\)"):
        cli(base + [str(tmp_path / "flat.npy")])
    with pytest.raises(SetupError, match=r"no such embeddings file"):
        cli(base + [str(tmp_path / "missing.npy")])
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(SetupError, match=r"--embedding-model all-MiniLM-L6-v2\) needs the "
                           r"sentence_transformers package"):
            cli(base[:-1] + ["--embedding-model", "all-MiniLM-L6-v2"])
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
