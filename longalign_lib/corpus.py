"""Long documents for Self-Instruct: collect texts from pluggable sources, shape them to a token-length range.

Run as: longalign corpus --preset cpu-demo      (writes <run_dir>/corpus.jsonl)
Usage:
    from longalign_lib.corpus import build_corpus, available_sources
    docs, notes = build_corpus(cfg.corpus, count_tokens)      # list[Document], notes on skipped sources

Sources (`corpus.sources`; each optional one is skipped with a note when absent on this machine):
    stdlib        Python standard library modules (genre code; present wherever Python is)
    pydoc_topics  the language reference topics behind `help()` (pydoc_data; genre reference)
    data          the public-domain KJV books shipped in data/ (genre literature)
    debian_docs   = python_docs + perl_pods + vim_docs + licenses (installed Debian documentation;
                    `make corpus-extras` installs more of it)
    dir:<path>    a directory of text/markdown/code files (also `corpus.dirs`)
    `corpus.hf_datasets` adds Hugging Face datasets: [{path, text_column, split, name, genre, title_column}],
    `path` being a hub id or a folder written by `Dataset.save_to_disk`.

Shaping (LongAlign wants 8k–64k-token documents; the CPU demo ~1k–6k): each genre's texts are cut into
paragraph units, and units are accumulated into documents whose target length is drawn from
[min_tokens, max_tokens] with density ∝ length^(upsample_long − 1) (1 = uniform, 2 = long documents twice as
likely at the top of the range as at the bottom, the paper's upsampling of long documents). Long texts give
several documents (at most `max_chunks_per_doc`), short ones are merged. Genres are sampled evenly
(round-robin), duplicates dropped.
"""
from __future__ import annotations

import hashlib
import random
import re
import sysconfig
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from html import unescape
from pathlib import Path

from .io import DATA_DIR, LongAlignError, iter_jsonl
from .llm import approx_tokens

CODE_EXTS = {".py", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts", ".java", ".sh", ".pl", ".pm", ".rb", ".lua"}
TEXT_EXTS = {".txt", ".md", ".rst", ".pod", ".tex", ".org", ".adoc", ".html", ".htm"} | CODE_EXTS
HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
LETTER = re.compile(r"[A-Za-z\u3400-\u4dbf\u4e00-\u9fff]")
DEBIAN_DOCS = ["python_docs", "perl_pods", "vim_docs", "licenses"]


@dataclass
class Document:
    """One long document (a line of corpus.jsonl)."""

    id: str
    source: str
    genre: str
    lang: str
    title: str
    text: str
    license: str
    n_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RawDoc:
    title: str
    text: str
    source: str
    genre: str
    license: str
    uid: str = ""


class SourceMissing(Exception):
    """An optional source that is not installed here (the message says how to get it)."""


def detect_lang(text: str) -> str:
    """'zh' when Han characters are at least 20% of the letters, else 'en' (enough to pick a prompt set)."""
    sample = text[:20000]
    letters = len(LETTER.findall(sample))
    return "zh" if letters and len(HAN.findall(sample)) / letters >= 0.2 else "en"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _html_to_text(html: str) -> str:
    html = re.sub(r"(?is)<(script|style).*?</\1>", " ", html)
    text = re.sub(r"(?s)<[^>]+>", " ", html)
    return re.sub(r"[ \t]+", " ", unescape(text))


def _files(paths: list[Path], rng: random.Random) -> list[Path]:
    files = sorted({p for p in paths if p.is_file()})
    rng.shuffle(files)
    return files


# ----------------------------------------------------------------------------------------------------------------
# sources: each returns an iterator of RawDoc (lazy: only what is needed is read)
# ----------------------------------------------------------------------------------------------------------------
def src_stdlib(rng: random.Random) -> Iterator[RawDoc]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "__pycache__", "ensurepip",
            "encodings")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    if not files:
        raise SourceMissing(f"no Python sources under {root}")
    for p in _files(files, rng):
        text = _read(p)
        if len(text) > 400:
            rel = p.relative_to(root).as_posix()
            yield RawDoc(f"Python stdlib {rel}", f"# file: Lib/{rel}\n{text}", "stdlib", "code", "PSF-2.0", rel)


def src_pydoc_topics(rng: random.Random) -> Iterator[RawDoc]:
    try:
        from pydoc_data.topics import topics  # optional: some Python builds omit it
    except ImportError:
        raise SourceMissing("pydoc_data is not installed with this Python") from None
    names = sorted(topics)
    rng.shuffle(names)
    for name in names:
        body = topics[name].strip()
        if len(body) > 200:
            yield RawDoc(f"Python reference: {name}", f"{name}\n{'=' * len(name)}\n\n{body}", "pydoc_topics",
                         "reference", "PSF-2.0", name)


def src_data(rng: random.Random) -> Iterator[RawDoc]:
    files = sorted(DATA_DIR.glob("kjv_*.txt"))
    if not files:
        raise SourceMissing(f"no data/kjv_*.txt next to the package ({DATA_DIR})")
    for p in _files(files, rng):
        book = p.stem.split("_", 1)[1].title()
        yield RawDoc(f"King James Bible, {book}", _read(p), "data", "literature", "public domain", p.name)


def src_python_docs(rng: random.Random) -> Iterator[RawDoc]:
    roots = sorted(Path("/usr/share/doc").glob("python3*/html/_sources"))
    files = [p for r in roots for p in r.rglob("*.txt")]
    if not files:
        raise SourceMissing("Python documentation not installed (apt-get install python3-doc; make corpus-extras)")
    for p in _files(files, rng):
        yield RawDoc(f"Python docs: {p.stem}", _read(p), "python_docs", "manual", "PSF-2.0", str(p))


def src_perl_pods(rng: random.Random) -> Iterator[RawDoc]:
    files = [p for p in Path("/usr/share/perl").glob("*/**/*.pod")] if Path("/usr/share/perl").exists() else []
    files += list(Path("/usr/share/perl5").rglob("*.pod")) if Path("/usr/share/perl5").exists() else []
    if not files:
        raise SourceMissing("no Perl pod documentation (apt-get install perl-doc)")
    for p in _files(files, rng):
        text = _read(p)
        if len(text) > 1000:
            yield RawDoc(f"Perl documentation: {p.stem}", text, "perl_pods", "manual",
                         "Artistic-1.0 or GPL-1.0+ (the Perl license)", str(p))


def src_vim_docs(rng: random.Random) -> Iterator[RawDoc]:
    files = list(Path("/usr/share/vim").glob("vim*/doc/*.txt")) if Path("/usr/share/vim").exists() else []
    if not files:
        raise SourceMissing("Vim help files not installed (apt-get install vim-runtime)")
    for p in _files(files, rng):
        yield RawDoc(f"Vim help: {p.name}", _read(p), "vim_docs", "manual", "Vim license", str(p))


def src_licenses(rng: random.Random) -> Iterator[RawDoc]:
    root = Path("/usr/share/common-licenses")
    files = [p for p in root.iterdir() if p.is_file() and not p.is_symlink()] if root.exists() else []
    if not files:
        raise SourceMissing("/usr/share/common-licenses not present (Debian base-files)")
    for p in _files(files, rng):
        yield RawDoc(f"License text: {p.name}", _read(p), "licenses", "legal", "verbatim copying permitted", p.name)


def src_dir(path: str, genre: str | None = None) -> Callable[[random.Random], Iterator[RawDoc]]:
    """Files of a directory; `genre` 'code' or 'text' keeps only those (a directory gives one stream per genre)."""
    root = Path(path).expanduser()

    def gen(rng: random.Random) -> Iterator[RawDoc]:
        if not root.is_dir():
            raise LongAlignError(f"corpus source dir:{path}: not a directory; fix corpus.dirs / corpus.sources")
        files = [p for p in root.rglob("*") if p.suffix.lower() in TEXT_EXTS]
        if not files:
            raise LongAlignError(f"corpus source dir:{path}: no {'/'.join(sorted(TEXT_EXTS))} files found")
        if genre is not None:
            files = [p for p in files if (p.suffix.lower() in CODE_EXTS) == (genre == "code")]
            if not files:
                raise SourceMissing(f"no {genre} files in {root}")
        for p in _files(files, rng):
            text = _read(p)
            if p.suffix.lower() in (".html", ".htm"):
                text = _html_to_text(text)
            kind = "code" if p.suffix.lower() in CODE_EXTS else "text"
            rel = p.relative_to(root).as_posix()
            yield RawDoc(rel, text, f"dir:{root}", kind, "user-provided (check before redistributing)", rel)

    return gen


def src_hf(spec: dict) -> Callable[[random.Random], Iterator[RawDoc]]:
    if not isinstance(spec, dict) or "path" not in spec:
        raise LongAlignError(f"corpus.hf_datasets entry {spec!r}: expected a mapping with at least 'path' "
                             "(and text_column, split, name, genre, title_column)")
    path, col = spec["path"], spec.get("text_column", "text")

    def gen(rng: random.Random) -> Iterator[RawDoc]:
        import datasets

        try:
            if Path(path).exists():
                ds = datasets.load_from_disk(path)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[spec.get("split", "train")]
            else:
                ds = datasets.load_dataset(path, spec.get("name"), split=spec.get("split", "train"))
        except Exception as e:  # noqa: BLE001  (any loading failure is the user's setting to fix)
            raise LongAlignError(f"corpus.hf_datasets {path!r}: could not load ({type(e).__name__}: {e})") from None
        if col not in ds.column_names:
            raise LongAlignError(f"corpus.hf_datasets {path!r}: no column {col!r}; columns: {', '.join(ds.column_names)}")
        order = list(range(len(ds)))
        rng.shuffle(order)
        tcol = spec.get("title_column")
        for i in order:
            row = ds[i]
            text = row[col]
            if isinstance(text, str) and text.strip():
                title = str(row[tcol]) if tcol and tcol in row else f"{Path(path).name} #{i}"
                yield RawDoc(title, text, f"hf:{path}", spec.get("genre", "hf"),
                             spec.get("license", "see the dataset card"), str(i))

    return gen


SOURCES: dict[str, Callable[[random.Random], Iterator[RawDoc]]] = {
    "stdlib": src_stdlib, "pydoc_topics": src_pydoc_topics, "data": src_data, "python_docs": src_python_docs,
    "perl_pods": src_perl_pods, "vim_docs": src_vim_docs, "licenses": src_licenses,
}


def resolve_sources(ccfg) -> list[tuple[str, Callable]]:
    """(name, generator factory) for every configured source, in order (debian_docs expanded)."""
    out: list[tuple[str, Callable]] = []
    for s in ccfg.sources:
        if s == "debian_docs":
            out += [(n, SOURCES[n]) for n in DEBIAN_DOCS]
        elif s.startswith("dir:"):
            out += [(f"{s}#{g}", src_dir(s[4:], g)) for g in ("code", "text")]
        elif s in SOURCES:
            out.append((s, SOURCES[s]))
        else:
            raise LongAlignError(f"corpus.sources: unknown source {s!r}; choose from "
                                 f"{', '.join([*SOURCES, 'debian_docs', 'dir:<path>'])}")
    out += [(f"dir:{d}#{g}", src_dir(d, g)) for d in ccfg.dirs for g in ("code", "text")]
    out += [(f"hf:{h.get('path') if isinstance(h, dict) else h}", src_hf(h)) for h in ccfg.hf_datasets]
    return out


def available_sources(ccfg) -> dict[str, str]:
    """{source: 'ok' | why it is skipped} — cheap: reads at most one file per source."""
    status = {}
    for name, factory in resolve_sources(ccfg):
        try:
            next(factory(random.Random(0)))
            status[name] = "ok"
        except SourceMissing as e:
            status[name] = f"skipped: {e}"
        except StopIteration:
            status[name] = "skipped: no usable documents"
    return status


# ----------------------------------------------------------------------------------------------------------------
# shaping to a token-length range
# ----------------------------------------------------------------------------------------------------------------
def draw_target(rng: random.Random, lo: int, hi: int, upsample: float) -> int:
    """A target length in [lo, hi] with density ∝ L^(upsample-1) (inverse-CDF sampling)."""
    if hi <= lo:
        return lo
    a = max(1e-6, float(upsample))
    u = rng.random()
    return int(round((lo ** a + u * (hi ** a - lo ** a)) ** (1.0 / a)))


def _units(text: str, cap_chars: int) -> list[str]:
    """Paragraphs (blank-line separated), long ones split at line and then character boundaries."""
    out = []
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip("\n")
        if not para.strip():
            continue
        if len(para) <= cap_chars:
            out.append(para)
            continue
        cur = ""
        for line in para.split("\n"):
            while len(line) > cap_chars:
                if cur:
                    out.append(cur)
                    cur = ""
                out.append(line[:cap_chars])
                line = line[cap_chars:]
            if cur and len(cur) + len(line) + 1 > cap_chars:
                out.append(cur)
                cur = line
            else:
                cur = f"{cur}\n{line}" if cur else line
        if cur:
            out.append(cur)
    return out


def shape_genre(raws: Iterator[RawDoc], count: Callable[[str], int], lo: int, hi: int, rng: random.Random,
                upsample: float = 1.0, max_chunks_per_doc: int = 2) -> Iterator[tuple[str, list[RawDoc], int]]:
    """Yield (text, raw docs it came from, n_tokens) with lo <= n_tokens <= hi, lazily."""
    cap_tokens = max(32, (hi - lo) // 4, 1)
    cap_chars = cap_tokens * 3  # ~3+ chars per token: a unit never exceeds cap_tokens by much
    hi_target = max(lo, hi - cap_tokens)
    target = draw_target(rng, lo, hi_target, upsample)
    parts: list[str] = []
    origin: list[RawDoc] = []
    n = emitted = 0

    def flush():
        """The finished chunk; start the next one with a fresh target length."""
        nonlocal parts, origin, n, emitted, target
        chunk = ("\n\n".join(parts), origin, n)
        parts, origin, n = [], [], 0
        emitted += 1
        target = draw_target(rng, lo, hi_target, upsample)
        return chunk

    for raw in raws:
        emitted = 0
        for u in _units(raw.text, cap_chars):
            t = count(u) + 1
            if n + t > hi and n >= lo:
                yield flush()
                if emitted >= max_chunks_per_doc:
                    break
            if n + t > hi:  # even alone too big (a dense unit): skip it
                continue
            if not origin or origin[-1] is not raw:
                origin.append(raw)
            parts.append(u)
            n += t
            if n >= target:
                yield flush()
                if emitted >= max_chunks_per_doc:
                    break


def make_counter(tokenizer=None) -> Callable[[str], int]:
    """Token counter: the given tokenizer's, else ~4 characters per token."""
    if tokenizer is None:
        return approx_tokens
    return lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])


def build_corpus(ccfg, count: Callable[[str], int] | None = None, progress: bool = True) -> tuple[list[Document], dict]:
    """Documents per CorpusConfig: genres sampled evenly, lengths in [min_tokens, max_tokens]. Returns (docs, notes)."""
    from tqdm.auto import tqdm

    if ccfg.min_tokens <= 0 or ccfg.max_tokens < ccfg.min_tokens:
        raise LongAlignError(f"corpus.min_tokens={ccfg.min_tokens}, corpus.max_tokens={ccfg.max_tokens}: "
                             "need 0 < min_tokens <= max_tokens")
    count = count or make_counter(None)
    rng = random.Random(ccfg.seed)
    streams: dict[str, Iterator] = {}
    notes: dict[str, str] = {}
    for name, factory in resolve_sources(ccfg):
        stable = name.rsplit("/", 1)[-1]  # seeds must not depend on where a folder lives
        gen = factory(random.Random(f"{ccfg.seed}:{stable}"))
        try:
            first = next(gen)
        except SourceMissing as e:
            notes[name] = f"skipped: {e}"
            continue
        except StopIteration:
            notes[name] = "skipped: no usable documents"
            continue
        notes[name] = "ok"

        def chain(first=first, gen=gen):
            yield first
            yield from gen

        streams[name] = shape_genre(chain(), count, ccfg.min_tokens, ccfg.max_tokens,
                                    random.Random(f"{ccfg.seed}:{stable}:len"), ccfg.upsample_long,
                                    ccfg.max_chunks_per_doc)
    if not streams:
        raise LongAlignError(f"corpus: no source produced documents ({notes}); add corpus.dirs or corpus.sources")
    # genres sampled evenly: round-robin over genres, within a genre round-robin over its sources
    by_genre: dict[str, list[str]] = {}
    genre_of = {}
    for name in streams:
        g = _genre_of_source(name, ccfg)
        genre_of[name] = g
        by_genre.setdefault(g, []).append(name)
    genres = sorted(by_genre)
    rng.shuffle(genres)
    docs: list[Document] = []
    seen: set[str] = set()
    turn = Counter()
    bar = tqdm(total=ccfg.n_docs, desc="corpus", disable=not progress, leave=False)
    while len(docs) < ccfg.n_docs and genres:
        for g in list(genres):
            if len(docs) >= ccfg.n_docs:
                break
            names = by_genre[g]
            got = None
            while names and got is None:
                name = names[turn[g] % len(names)]
                turn[g] += 1
                try:
                    text, origin, n = next(streams[name])
                except StopIteration:
                    names.remove(name)
                    continue
                h = hashlib.sha1(text.encode("utf-8")).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                got = (name, text, origin, n, h)
            if got is None:
                genres.remove(g)
                continue
            name, text, origin, n, h = got
            first = origin[0]
            title = first.title if len(origin) == 1 else f"{first.title} (+{len(origin) - 1} more)"
            licenses = sorted({o.license for o in origin})
            docs.append(Document(id=f"{first.genre}-{h[:10]}", source=first.source, genre=first.genre,
                                 lang=detect_lang(text), title=title, text=text, license="; ".join(licenses),
                                 n_tokens=n))
            bar.update(1)
    bar.close()
    if len(docs) < ccfg.n_docs:
        notes["shortfall"] = f"only {len(docs)} of {ccfg.n_docs} documents fit {ccfg.min_tokens}-{ccfg.max_tokens} tokens"
    return docs, notes


def _genre_of_source(name: str, ccfg) -> str:
    fixed = {"stdlib": "code", "pydoc_topics": "reference", "data": "literature", "python_docs": "manual",
             "perl_pods": "manual", "vim_docs": "manual", "licenses": "legal"}
    if name in fixed:
        return fixed[name]
    if name.startswith("hf:"):
        for h in ccfg.hf_datasets:
            if f"hf:{h.get('path')}" == name:
                return h.get("genre", "hf")
    if name.startswith("dir:"):
        return "code" if name.endswith("#code") else "text"
    return name


def corpus_figure(docs: list[Document]):
    """Two panels: documents per genre, and token lengths per genre (strip plot)."""
    from . import plots  # matplotlib: imported only when a figure is drawn

    fig, (a1, a2) = plots.figure(1, 2, figsize=(10, 3.8))
    counts = Counter(d.genre for d in docs)
    genres = sorted(counts)
    colors = [plots.CYCLE[i % len(plots.CYCLE)] for i in range(len(genres))]
    a1.bar(genres, [counts[g] for g in genres], color=colors)
    a1.set_title(f"Genre mix ({len(docs)} documents)")
    a1.set_ylabel("documents")
    a1.tick_params(axis="x", rotation=30)
    from matplotlib.ticker import MaxNLocator

    a1.yaxis.set_major_locator(MaxNLocator(integer=True))
    for i, g in enumerate(genres):
        ys = [d.n_tokens for d in docs if d.genre == g]
        xs = [i + (k % 7 - 3) * 0.04 for k in range(len(ys))]
        a2.scatter(xs, ys, color=colors[i], s=22, alpha=0.8)
    a2.set_xticks(range(len(genres)), genres, rotation=30)
    a2.set_ylabel("tokens per document")
    a2.set_title("Document lengths")
    fig.tight_layout()
    return fig


def load_corpus(path: str | Path) -> list[Document]:
    """Read corpus.jsonl back (errors name file:line and the missing field)."""
    docs = []
    need = ("id", "genre", "text")
    for line, row in iter_jsonl(path):
        missing = [k for k in need if not isinstance(row, dict) or k not in row]
        if missing:
            raise LongAlignError(f"{path}:{line}: field {missing[0]!r} missing; corpus records need {', '.join(need)}")
        docs.append(Document(id=str(row["id"]), source=row.get("source", ""), genre=row["genre"],
                             lang=row.get("lang") or detect_lang(row["text"]), title=row.get("title", ""),
                             text=row["text"], license=row.get("license", ""), n_tokens=int(row.get("n_tokens", 0))))
    return docs
