"""Queries: words and example images -> one query vector -> FAISS top-k -> filtered, typed results.

How a query becomes one vector (all embeddings L2-normalised):

    q = normalise( sum_i w_i * p_i  -  lambda * sum_j n_j )

p_i are the positive terms (texts, each the prompt ensemble of its templates
unless raw; images, the stored vector when the file is indexed, else encoded
on the fly), w_i their weights (1 unless given), n_j the negative terms and
lambda the negative weight (NEGATIVE_WEIGHT by default, chosen by measurement
on the tiny test model: it demotes what it names while keeping the rest of the
ranking). Scores are cosine similarities between q and each image.

Filters never lose recall: the ids they allow are selected in SQL first and
FAISS searches only those (an id selector on an exact index; on an
approximate index a filtered set small enough is scored exactly from the
database's own vectors instead).

Concept terms are stored directions (`clipfind concept learn`, weighted like
any term); --more-like/--less-like then move q by Rocchio's rule
(`retrieval.query.feedback`). Every result also gets a relevance in [0, 1],
calibrated per query against a sample of the library (`retrieval.query.relevance`).

Nothing here imports torch: the model is loaded only when a text is not in the
cache or a query image is not in the library, and then through ONNX Runtime
when the library has an export (`retrieval.query.runtime`), one tower at a time.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
import weakref
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import InputError, UsageError
from retrieval.media.regular import file_kind
from retrieval.prompting.prompts import encode_prompted
from retrieval.query.runtime import QueryRuntimes
from retrieval.query.textcache import CACHE_NAME, CachedText, TextCache, cache_key
from retrieval.query.types import (
    DEFAULT_TEMPLATES,
    NEGATIVE_WEIGHT,
    Filters,
    Query,
    SearchResponse,
    SearchResult,
    Term,
    check_weight,
    normalise_path_filter,
)
from retrieval.store.reads import in_list
from retrieval.store.rows import blobs_to_matrix, datetime_from_db, path_from_db, path_to_db
from retrieval.store.sql import in_chunks, under_folder
from retrieval.store.tuning import rerank

if TYPE_CHECKING:
    from retrieval.store.fast_read import QueryLibrary
    from retrieval.store.library import Library

EXACT_FILTER_LIMIT = 50_000  # filtered sets up to this size are scored exactly on approximate indexes
RESAMPLE_GROWTH = 0.1  # the relevance background is sampled again once the library changes size by 10%
# One query is a batch of a few texts or one image: torch's second thread costs more
# in hand-offs than it saves (tiny model, busy 2-core machine: 300 ms vs 2 ms per
# text batch), so queries run on one thread; None leaves torch's setting alone.
QUERY_THREADS: int | None = 1
GLOB_CHARS = set("*?[")  # a --path with any of these is a glob, else a folder


# -- the searcher ------------------------------------------------------------------------
class Searcher:
    """Answers queries on one library; keeps the model (once needed), index and text cache warm."""

    def __init__(self, library: Library | QueryLibrary, spec=None, device: str = "auto", precision: str = "auto",
                 cache: TextCache | None = None, query_threads: int | None = QUERY_THREADS,
                 runtime: str = "auto", onnx_threads: int | None = None, one_shot: bool = False,
                 onnx_options: dict | None = None) -> None:
        """`query_threads` run torch encoders, `onnx_threads` ONNX Runtime sessions (default:
        `query_threads`); `one_shot`: the process answers one query and exits. `clipfind search`
        gives both (`config.query_threads`); the server gives `onnx_options`
        (`runtime.serving_options`); the library API keeps the defaults."""
        record = library.model_record
        if record is None:
            raise library.empty_error()
        if spec is not None:
            library.check_model_spec(spec)
        self.library = library
        self.record = record
        self.spec = spec
        self.device, self.precision = device, precision
        self.cache = cache if cache is not None else TextCache(library.root / CACHE_NAME)
        self.query_threads = query_threads
        self._index_stamp: tuple[int, int] | None = None
        self._background = None  # retrieval.query.relevance.Background, sampled on first query
        # Held around the model, the text cache and FAISS only (none is thread-safe), never
        # while a query image is read or decoded. A server shares it between its threads.
        self.lock: contextlib.AbstractContextManager = contextlib.nullcontext()
        self.runtimes = QueryRuntimes(library, runtime, device, query_threads,
                                      torch_encoder=self.encoder, onnx_threads=onnx_threads, one_shot=one_shot,
                                      onnx_options=onnx_options)

    @property
    def model_label(self) -> str:
        return str(self.record.get("label", ""))

    @property
    def random_weights(self) -> bool:
        return bool(self.record.get("spec", {}).get("random_weights"))

    def encoder(self):
        return self.library.encoder(self.spec, self.device, self.precision)

    # -- query vectors -----------------------------------------------------------------
    def text_vectors(self, texts: Sequence[str], template_list: tuple[str, ...] | None,
                     warnings: list[str]) -> np.ndarray:
        """One unit vector per text, from the cache where possible, else one batched encode."""
        keys = [cache_key(self.record["fingerprint"], template_list, t) for t in texts]
        found: dict[int, CachedText] = {}
        for i, key in enumerate(keys):
            entry = self.cache.get(key)
            if entry is not None:
                found[i] = entry
        missing = [i for i in range(len(texts)) if i not in found]
        if missing:
            encoder = self.runtimes.for_tower("text", warnings)
            vectors = self._encode_texts(encoder, [texts[i] for i in missing], template_list, warnings)
            for i, vector in zip(missing, vectors):
                entry = CachedText(vector, self._tokens(encoder, texts[i], template_list),
                                   encoder.context_length)
                self.cache.put(keys[i], entry)
                found[i] = entry
        for i, t in enumerate(texts):
            if found[i].tokens > found[i].context:
                shown = t if len(t) <= 40 else t[:37] + "..."
                warnings.append(f'query "{shown}" needs {found[i].tokens} tokens; the model '
                                f"reads only {found[i].context}, so the rest was cut off")
        return np.stack([found[i].vector for i in range(len(texts))]) if texts else np.zeros((0, 0))

    def _encode_texts(self, encoder, texts: list[str], templates: tuple[str, ...] | None,
                      warnings: list[str]) -> np.ndarray:
        def encode(encoder):
            with self.runtimes.thread_limit(encoder):
                if templates is None:
                    return encoder.encode_texts(texts)
                return encode_prompted(encoder, texts, templates)

        return self.runtimes.run("text", encoder, encode, warnings)

    @staticmethod
    def _tokens(encoder, phrase: str, templates: tuple[str, ...] | None) -> int:
        texts = [phrase] if templates is None else [t.format(phrase) for t in templates]
        return max(encoder.token_count(t) for t in texts)

    def image_vector(self, path: str, warnings: list[str]) -> tuple[np.ndarray, int | None]:
        """(unit vector, id of the row that *is* this file or None); stored vectors are reused."""
        from retrieval.media import remote  # image queries only: a text query imports no more

        if remote.is_url(path):
            return self._url_vector(path, warnings)
        path = os.path.abspath(path)
        stored = path_to_db(path)[0]
        with self.library.reads() as reads:
            row = reads.first("SELECT id, size, mtime_ns, embedding FROM images WHERE path = :p", {"p": stored})
            try:
                st = os.stat(path)
            except OSError as exc:
                if row is not None:
                    warnings.append(f"{path} is gone from disk; using its stored vector")
                    return self._unpack(row[3]), row[0]
                raise InputError(f"cannot read query image {path}: {exc.strerror or exc}") from exc
            if not stat.S_ISREG(st.st_mode):  # /dev/zero, a FIFO: reading would never end
                raise InputError(f"query image {path} is not a regular file ({file_kind(st.st_mode)})")
            if row is not None and row[1] == st.st_size and row[2] == st.st_mtime_ns:
                return self._unpack(row[3]), row[0]
            # Pillow comes with it: imported by image queries only
            from retrieval.media.scan import content_hash

            try:
                digest = content_hash(path)
            except OSError as exc:
                raise InputError(f"cannot read query image {path}: {exc.strerror or exc}") from exc
            same = reads.first("SELECT id, embedding FROM images WHERE content_hash = :h LIMIT 1", {"h": digest})
        own_id = row[0] if row is not None else None
        if same is not None:
            return self._unpack(same[1]), own_id
        return self._encode_image(path, None, warnings), own_id

    def _encode_image(self, path: str, data: bytes | None, warnings: list[str]) -> np.ndarray:
        """The query vector of one image file (or of its bytes, `data`), decoded as indexing decodes."""
        from retrieval.media.images import ImageError, open_image

        size = int(self.record.get("image_size") or 0)
        try:
            # Decoded as the indexer decodes (JPEG draft mode down to the model's size): the same
            # pixels as a stored vector of this file would have, and a 12-MP photo decodes and
            # resizes in 0.18 s instead of 0.54 s (2 busy cores).
            image = open_image(path, draft_size=(size, size) if size else None, data=data)
        except ImageError as exc:
            raise ImageError(exc.kind, f"query image {exc}") from None
        def encode(encoder):
            with self.runtimes.thread_limit(encoder):
                return encoder.encode_images([image])[0]

        with self.lock:  # read and decoded above without it: a slow file stalls no other query
            return self.runtimes.run("image", self.runtimes.for_tower("image", warnings), encode, warnings)

    def _url_vector(self, url: str, warnings: list[str]) -> tuple[np.ndarray, int | None]:
        """An indexed URL's stored vector (the library's view of it: its store is not asked
        again, as `verify` does not), else the object read through fsspec and encoded."""
        from retrieval.media import remote
        from retrieval.media.formats import ImageError

        with self.library.reads() as reads:
            row = reads.first("SELECT id, embedding FROM images WHERE path = :p", {"p": path_to_db(url)[0]})
        if row is not None:
            return self._unpack(row[1]), row[0]
        try:
            data = remote.read_bytes(url)
        except ImageError as exc:
            raise InputError(f"cannot read query image {exc}") from None
        return self._encode_image(url, data, warnings), None

    def _unpack(self, blob: bytes) -> np.ndarray:
        return blobs_to_matrix([blob], int(self.record["embed_dim"]))[0].copy()

    def query_vector(self, query: Query, warnings: list[str]) -> tuple[np.ndarray, set[int]]:
        """The combined unit query vector, and the ids of library rows that are query images."""
        if not query.positive and not query.more_like:
            raise InputError("nothing to search for: give a text, --image FILE, --concept NAME or --more-like FILE")
        for term in query.positive + query.negative:
            if term.kind == "text" and not term.value.strip():
                raise InputError("empty query text")
            check_weight(term.weight, term.describe())
        if check_weight(query.negative_weight, "the negative terms") < 0:
            raise UsageError("the negative weight must be a number >= 0")
        terms = query.positive + query.negative
        texts = [t.value.strip() for t in terms if t.kind == "text"]
        # Images first: a bad query file is refused before any wait for the model lock.
        image_vecs = {position: self.image_vector(term.value, warnings)
                      for position, term in enumerate(terms) if term.kind == "image"}
        if texts:
            with self.lock:
                text_vecs = iter(self.text_vectors(texts, query.templates, warnings))
        self_ids: set[int] = set()
        combined = np.zeros(int(self.record["embed_dim"]), np.float32)
        for position, term in enumerate(terms):
            if term.kind == "text":
                vector = next(text_vecs)
            elif term.kind == "concept":
                vector = self.concept_vector(term.value)
            else:
                vector, own_id = image_vecs[position]
                if own_id is not None and position < len(query.positive):
                    self_ids.add(own_id)
            sign = 1.0 if position < len(query.positive) else -query.negative_weight
            combined += sign * term.weight * vector
        if query.more_like or query.less_like:
            return self.feedback_vector(combined if terms else None, query, warnings, self_ids), self_ids
        norm = float(np.linalg.norm(combined))
        if norm < 1e-6:
            raise InputError("the query terms cancel out; change the weights or the negative terms")
        return (combined / norm).astype(np.float32), self_ids

    def concept_vector(self, name: str) -> np.ndarray:
        """A stored concept's unit direction (refused if another model learned it)."""
        from retrieval.store.concepts import concept_direction

        return concept_direction(self.library, name, str(self.record["fingerprint"]))

    def feedback_vector(self, combined: np.ndarray | None, query: Query, warnings: list[str],
                        self_ids: set[int]) -> np.ndarray:
        """The query moved toward --more-like and away from --less-like images (Rocchio)."""
        from retrieval.query.feedback import feedback_vector

        def image_vector(path: str) -> np.ndarray:
            vector, own_id = self.image_vector(path, warnings)
            if own_id is not None and path in query.more_like:
                self_ids.add(own_id)
            return vector

        return feedback_vector(combined, query.more_like, query.less_like, image_vector)

    # -- searching ---------------------------------------------------------------------
    def search(self, query: Query, k: int = 10, filters: Filters | None = None) -> SearchResponse:
        return self._answer(query, query.describe(), k, filters or Filters(), leave_out_query_files=False)

    def similar(self, path: str, k: int = 10, filters: Filters | None = None) -> SearchResponse:
        """Images most like the file at `path`, never the file itself (near-duplicates first)."""
        from retrieval.media.remote import is_url  # a URL row's "path" is its URL, kept as it is

        query = Query(positive=[Term("image", path if is_url(path) else os.path.abspath(path))])
        return self._answer(query, f"like {query.positive[0].value}", k, filters or Filters(),
                            leave_out_query_files=True)

    def _answer(self, query: Query, described: str, k: int, filters: Filters,
                leave_out_query_files: bool) -> SearchResponse:
        if k < 1:
            raise InputError("k must be at least 1")
        started = time.perf_counter()
        warnings: list[str] = []
        cache_before = (self.cache.hits, self.cache.misses)
        vector, query_files = self.query_vector(query, warnings)
        exclude = query_files if leave_out_query_files else set()
        timings = {"encode": _ms(started)}
        mark = time.perf_counter()
        allowed = self.allowed_ids(filters) if filters.selects_rows else None
        timings["sql_filter"] = _ms(mark)
        with self.lock:
            mark = time.perf_counter()
            vectors = self.fresh_vectors()
            timings["sync"] = _ms(mark)
            total = int(vectors.index.ntotal) if vectors.index is not None else 0
            if total == 0:
                raise self.library.empty_error()
            mark = time.perf_counter()
            ids, scores = self._nearest(vectors, vector, k + len(exclude), allowed, filters)
            timings["faiss"] = _ms(mark)
        keep = [(i, s) for i, s in zip(ids, scores) if i not in exclude
                and (filters.min_score is None or s >= filters.min_score)][:k]
        mark = time.perf_counter()
        relevances = self.relevances(vector, [s for _, s in keep], total)
        keep, relevances = cut_by_relevance(keep, relevances, filters)
        timings["relevance"] = _ms(mark)
        mark = time.perf_counter()
        results = self.fetch_results(keep)
        by_id = {image_id: float(r) for (image_id, _), r in zip(keep, relevances)}
        for result in results:
            result.relevance = by_id[result.image_id]
        timings["sql_fetch"] = _ms(mark)
        timings["sql"] = round(timings.pop("sql_filter") + timings.pop("sql_fetch"), 3)
        timings["total"] = _ms(started)
        if self.random_weights:
            warnings.insert(0, f"using {self.model_label}")
        return SearchResponse(
            results=results, query=described, model=self.model_label, random_weights=self.random_weights,
            warnings=warnings, timings=timings, library_size=total,
            text_cache={"hits": self.cache.hits - cache_before[0], "misses": self.cache.misses - cache_before[1]},
        )

    def relevances(self, vector: np.ndarray, scores: list[float], total: int) -> np.ndarray:
        """Calibrated relevance of each score down the list (background sampled once per library size)."""
        from retrieval.query.relevance import Background, calibrate

        background = self._background
        if background is None or abs(background.library_size - total) > total * RESAMPLE_GROWTH:
            self._background = Background.sample(self.library, int(self.record["embed_dim"]), total)
        elif background.library_size != total:  # the same sample stands for a library a little bigger
            self._background = Background(background.vectors, total)
        return calibrate(vector, self._background).relevance(np.asarray(scores))

    def fresh_vectors(self):
        """The index, caught up with the database; re-read first if another process saved a newer one.

        The indexer prunes the change log once it has saved the index, so a long-lived
        searcher (the server) catching up from its own older copy would find a gap and
        rebuild from every row; reading the saved file and catching up from there does not.
        """
        vectors = self.library.vectors(sync=False)
        if self._index_stamp is not None and _stamp(vectors.state_path) != self._index_stamp:
            vectors.load()
        vectors.sync(self.library, reader=True)
        self._index_stamp = _stamp(vectors.state_path)
        return vectors

    def _nearest(self, vectors, vector: np.ndarray, k: int, allowed: np.ndarray | None,
                 filters: Filters) -> tuple[list[int], list[float]]:
        if allowed is not None and len(allowed) == 0:
            return [], []
        exact = vectors.state.factory == "Flat"
        if allowed is not None and not exact and len(allowed) <= EXACT_FILTER_LIMIT:
            return self._exact_over(filters, vector, k)
        refine = vectors.state.refine
        found_scores, found_ids = _single_thread_search(vectors, vector, k * refine, allowed)
        if refine > 1:  # compressed codes: order the candidates by their exact stored vectors
            from retrieval.store.index_builder import SqlVectorSource

            with self.library.reads() as reads:
                fetch = SqlVectorSource(reads, int(self.record["embed_dim"])).fetch
                found_scores, found_ids = rerank(vector[None, :], found_ids, fetch, k)
        pairs = [(int(i), float(s)) for i, s in zip(found_ids[0], found_scores[0]) if i >= 0]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def _exact_over(self, filters: Filters, vector: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        """Exact scores over the filtered rows' own vectors: recall an approximate index cannot lose."""
        with self.library.reads() as reads:
            clauses, params = filter_sql(filters, reads.dialect)
            rows = reads.all("SELECT id, embedding FROM images WHERE " + " AND ".join(clauses), params)
        scores = blobs_to_matrix([r[1] for r in rows], int(self.record["embed_dim"])) @ vector
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(rows[i][0]) for i in order], [float(scores[i]) for i in order]

    def allowed_ids(self, filters: Filters) -> np.ndarray:
        """Ids of the rows every SQL-side filter allows (path, dates, tags)."""
        with self.library.reads() as reads:
            clauses, params = filter_sql(filters, reads.dialect)
            ids = reads.column("SELECT id FROM images WHERE " + " AND ".join(clauses), params)
        return np.asarray(ids, dtype=np.int64)

    def fetch_results(self, pairs: list[tuple[int, float]]) -> list[SearchResult]:
        if not pairs:
            return []
        by_id: dict[int, tuple] = {}
        with self.library.reads() as reads:
            for part in in_chunks([i for i, _ in pairs]):
                listed, params = in_list(part)
                by_id.update((row[0], row) for row in reads.all(
                    "SELECT id, path, path_bytes, size, width, height, taken_at FROM images "
                    f"WHERE id IN {listed}", params))
        out = []
        for image_id, score in pairs:
            row = by_id.get(image_id)
            if row is None:  # removed between the FAISS search and now
                continue
            _, path, path_bytes, size, width, height, taken_at = row
            out.append(SearchResult(len(out) + 1, float(score), image_id, path_from_db(path, path_bytes),
                                    size, width, height, datetime_from_db(taken_at)))
        return out


def _single_thread_search(vectors, vector: np.ndarray, k: int, allowed: np.ndarray | None):
    """One query vector: FAISS parallelises over queries, so extra OpenMP threads only spin.

    Their spinning also starves torch's threads on a small machine (seen here: a
    tiny text encode went from 6 ms to 300 ms), so a single query runs on one.
    """
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return vectors.search(vector[None, :], k, allowed_ids=allowed)
    finally:
        faiss.omp_set_num_threads(before)


# SQLite's julianday() reads both the stored DateTime text and a bound ISO string.
_WHEN = "coalesce(julianday(taken_at), julianday(mtime_ns / 1e9, 'unixepoch', 'localtime'))"


def filter_sql(filters: Filters, dialect: str = "sqlite") -> tuple[list[str], dict[str, Any]]:
    """WHERE clauses (ANDed) and parameters for the row filters, in `dialect`'s SQL.

    PostgreSQL has no GLOB or julianday(): a glob becomes an anchored regular expression, and
    a date bound is compared with `taken_at`, else with the file's mtime turned into local
    time here (as SQLite's 'localtime' does), so both stores select the same rows.
    """
    postgres = dialect == "postgresql"
    clauses: list[str] = []
    params: dict[str, Any] = {}
    if filters.path:
        pattern = filters.path
        if GLOB_CHARS & set(pattern):
            clauses.append("path ~ :glob" if postgres else "path GLOB :glob")
            params["glob"] = glob_to_regex(pattern) if postgres else pattern
        else:
            clause, folder_params = under_folder(pattern)
            clauses.append(clause)
            params.update(folder_params)
    for name, op, bound in (("after", ">=", filters.after), ("before", "<", filters.before)):
        if not bound:
            continue
        naive = bound.replace(tzinfo=None)
        if postgres:
            clauses.append(f"(CASE WHEN taken_at IS NOT NULL THEN taken_at {op} :{name} "
                           f"ELSE mtime_ns {op} :{name}_ns END)")
            params[name], params[f"{name}_ns"] = naive, int(naive.timestamp() * 1e9)
        else:
            clauses.append(f"{_WHEN} {op} julianday(:{name})")
            params[name] = naive.isoformat(sep=" ")
    for i, tag in enumerate(filters.tags):
        clauses.append(f"id IN (SELECT image_id FROM tags WHERE label = :tag{i})")
        params[f"tag{i}"] = tag
    return clauses or ["1 = 1"], params


def glob_to_regex(pattern: str) -> str:
    """SQLite's GLOB as a POSIX regular expression: `*` any run, `?` one character, `[...]` a set
    (`[^...]` its complement), everything else literal, anchored at both ends."""
    out, i = ["^"], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        elif ch == "[" and (end := pattern.find("]", i + 2 if pattern[i + 1:i + 2] in ("^", "]") else i + 1)) > 0:
            body = pattern[i + 1:end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            body = body.replace("\\", "\\\\")
            out.append("[" + ("^" if negate else "") + body + "]")
            i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out) + "$"


def cut_by_relevance(pairs: list[tuple[int, float]], relevances: np.ndarray,
                     filters: Filters) -> tuple[list[tuple[int, float]], np.ndarray]:
    """Apply --until-irrelevant (stop at the first irrelevant result) and --min-relevance."""
    from retrieval.query.relevance import cut_until_irrelevant

    if filters.until_irrelevant:
        n = cut_until_irrelevant(relevances)
        pairs, relevances = pairs[:n], relevances[:n]
    if filters.min_relevance is not None:
        keep = relevances >= filters.min_relevance
        pairs, relevances = [p for p, ok in zip(pairs, keep) if ok], relevances[keep]
    return pairs, relevances


def _stamp(path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def _ms(since: float) -> float:
    return round((time.perf_counter() - since) * 1000, 3)


# -- the library-level API ---------------------------------------------------------------
_SEARCHERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def searcher_for(library: Library) -> Searcher:
    """One warm searcher per open library (its text cache and model live with it)."""
    searcher = _SEARCHERS.get(library)
    if searcher is None or searcher.library.model_record != searcher.record:
        searcher = Searcher(library)
        _SEARCHERS[library] = searcher
    return searcher


def search(library: Library, text: str | Sequence[str] = (), *, image: str | Sequence[str] = (),
           negative: str | Sequence[str] = (), negative_image: str | Sequence[str] = (),
           k: int = 10, templates: str | None = DEFAULT_TEMPLATES, raw: bool = False,
           image_weight: float = 1.0, negative_weight: float = NEGATIVE_WEIGHT,
           path: str | None = None, after: datetime | None = None, before: datetime | None = None,
           tags: Sequence[str] = (), min_score: float | None = None, concept: str | Sequence[str] = (),
           more_like: str | Sequence[str] = (), less_like: str | Sequence[str] = (),
           min_relevance: float | None = None, until_irrelevant: bool = False) -> SearchResponse:
    """Search `library` by text, example images and/or learned concepts; see the module docstring.

        lib.search("a red circle", k=5)
        lib.search("circle", negative="red", path="/photos/2024")
        lib.search(concept="my dog", until_irrelevant=True, k=1000)
        lib.search("a dog", more_like=["good.jpg"], less_like=["bad.jpg"])
    """
    query = Query.build(text, image, negative, negative_image, image_weight, templates, raw, negative_weight,
                        concept, more_like, less_like)
    filters = Filters(path=normalise_path_filter(path) if path else None, after=after, before=before,
                      tags=tuple([tags] if isinstance(tags, str) else tags), min_score=min_score,
                      min_relevance=min_relevance, until_irrelevant=until_irrelevant)
    if library.model_record is None:
        raise library.empty_error()
    return searcher_for(library).search(query, k, filters)
