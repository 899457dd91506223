"""``ppl-vae data fetch``: real download code, exercised against a server on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import threading

import pytest

from ppl_vae.cli.main import main
from ppl_vae.data.fetch import fetch_corpus


@pytest.fixture
def octis_mirror(tmp_path):
    """A local copy of OCTIS's layout (BBC_News only) served over HTTP on 127.0.0.1."""
    root = tmp_path / "mirror"
    folder = root / "BBC_News"
    folder.mkdir(parents=True)
    (folder / "corpus.tsv").write_text("economy growth bank\ttrain\tbusiness\n"
                                       "match goal team\ttest\tsport\n")
    (folder / "vocabulary.txt").write_text("bank\neconomy\ngoal\ngrowth\nmatch\nteam\n")
    (folder / "metadata.json").write_text('{"total_documents": 2}')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_downloads_every_file_and_leaves_no_partial_files(tmp_path, octis_mirror):
    dest = tmp_path / "bbc"
    folder = fetch_corpus("bbc_news", dest, base_url=octis_mirror, progress=False)
    assert folder == dest
    assert (dest / "corpus.tsv").read_text().startswith("economy growth bank\ttrain")
    assert (dest / "vocabulary.txt").read_text().split() == ["bank", "economy", "goal",
                                                             "growth", "match", "team"]
    assert not list(dest.glob(".*.part"))
    # already there: nothing is downloaded again (the server is not asked)
    assert fetch_corpus("bbc_news", dest, base_url="http://127.0.0.1:9", progress=False) == dest


def test_fetch_errors_name_the_address_and_leave_nothing_behind(tmp_path, octis_mirror):
    with pytest.raises(OSError, match=r"/M10/corpus.tsv: the server answered 404"):
        fetch_corpus("m10", tmp_path / "m10", base_url=octis_mirror, progress=False)
    assert not list((tmp_path / "m10").glob("*")) and not list((tmp_path / "m10").glob(".*"))
    with pytest.raises(ValueError, match="unknown corpus 'bbc'"):
        fetch_corpus("bbc", tmp_path / "x")


def test_cli_data_fetch_into_the_data_home(tmp_path, octis_mirror, monkeypatch, capsys):
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "home"))
    monkeypatch.setattr("ppl_vae.data.fetch.OCTIS_URL", octis_mirror)
    main(["data", "fetch", "bbc_news"])
    assert (tmp_path / "home" / "topics" / "BBC_News" / "corpus.tsv").exists()
    assert "bbc_news: " in capsys.readouterr().out


def test_a_corpus_given_by_name_is_fetched_on_first_use(tmp_path, octis_mirror, monkeypatch):
    from ppl_vae.models.topics import TopicSpec, topic_corpus

    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "home"))
    monkeypatch.setattr("ppl_vae.data.fetch.OCTIS_URL", octis_mirror)
    monkeypatch.chdir(tmp_path)  # no folder called bbc_news here
    corpus = topic_corpus(TopicSpec(model="prodlda", corpus="bbc_news", topics=2))
    assert corpus.vocab_size == 6
    assert (tmp_path / "home" / "topics" / "BBC_News" / "vocabulary.txt").exists()
