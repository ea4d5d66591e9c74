"""Contamination firewall: recall on lightly edited test items, false positives on unrelated text, documents/s.

Text, all offline:
- test items: docstring paragraphs (12-120 words) of the installed Python's standard library;
- unrelated documents: the Debian package documentation under /usr/share/doc (changelogs, NEWS,
  READMEs, copyright files; packages named *python* left out, as they ship the same docstrings),
  cut into documents of ``--words`` words (100 by default: a paragraph, short as training
  documents often are). Without /usr/share/doc, the standard library's other modules are used.
- contaminated documents: each item, lightly edited, inserted at a random place in an unrelated
  document. "Light" is ``rate`` × words edits (swap two adjacent words, drop a word, change a
  word's case, add or remove punctuation); recall is reported at several rates and mixes.

A flagged unrelated document counts as a false positive unless it shares a run of 6 normalised
words with the item it matched (then the text really is there: the package documents quote it).
Speed is the vectorised check (``Checker``) over in-memory batches, cold (vocabulary empty) and
warm, and end to end from a JSONL file (JSON parsing and the corpus digest included); the
baseline, interleaved on the same documents, is a plain-Python check of the same scheme
(normalise, a dict of word keys, a set of shingles per document).

    python bench/bench_contamination.py            # full: 2,000 items, 200,000 documents (a few minutes)
    python bench/bench_contamination.py --quick    # 500 items, 20,000 documents
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO)]

from _common import loadavg, report, spread  # noqa: E402
from airlock.contamination.corpus import Reader, batched  # noqa: E402
from airlock.contamination.matcher import Checker, check_batches  # noqa: E402
from airlock.contamination.scheme import (  # noqa: E402
    STOP_WORDS,
    Fingerprint,
    Scheme,
    fingerprint_items,
    shingle_hash,
    word_key,
    words,
)
from tests.contamination.corpus_text import documents, insert, light_edit, paragraphs, stdlib_files  # noqa: E402

DOC_ROOT = Path("/usr/share/doc")
DOC_NAMES = ("changelog", "news", "readme", "copyright", "authors", "history", "todo")


def debian_docs(words_per_doc: int, limit: int) -> Iterator[str]:
    """Yield documents of ``words_per_doc`` words cut from /usr/share/doc's text files."""
    carry: list[str] = []
    produced = 0
    for package in sorted(DOC_ROOT.iterdir()):
        if "python" in package.name.lower() or not package.is_dir():
            continue
        for path in sorted(package.rglob("*")):
            name = path.name.lower()
            if not path.is_file() or path.is_symlink() or not name.startswith(DOC_NAMES):
                continue
            try:
                raw = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            carry.extend(raw.decode("utf-8", errors="replace").split())
            while len(carry) >= words_per_doc:
                yield " ".join(carry[:words_per_doc])
                del carry[:words_per_doc]
                produced += 1
                if produced >= limit:
                    return


def reference_check(fp: Fingerprint, docs: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """The plain-Python baseline: per document, its shingle set; per item, the fraction found."""
    n = fp.scheme.ngram
    owners: dict[int, list[int]] = defaultdict(list)
    for idx, item in enumerate(fp.items):
        for h in item.shingles.tolist():
            owners[h].append(idx)
    keys: dict[str, int] = {}
    found: set[tuple[str, str]] = set()
    for doc_id, text in docs:
        ws = words(text)
        for w in ws:
            if w not in keys:
                keys[w] = word_key(fp.salt, w)
        shingles = {shingle_hash([keys[w] for w in ws[i : i + n]]) for i in range(len(ws) - n + 1)}
        counts: dict[int, int] = defaultdict(int)
        for h in shingles:
            for idx in owners.get(h, ()):
                counts[idx] += 1
        for idx, c in counts.items():
            size = fp.items[idx].shingles.size
            if c / size >= fp.scheme.threshold and c >= min(size, fp.scheme.min_shingles):
                found.add((doc_id, fp.items[idx].id))
    return found


def run_checker(fp: Fingerprint, docs: list[tuple[str, str]], batch: int) -> tuple[float, set[tuple[str, str]]]:
    """Return (seconds, matched pairs) of one cold vectorised pass."""
    checker = Checker([("r", fp)])
    start = time.perf_counter()
    found = {(m.document, m.item) for part in batched(iter(docs), batch) for m in checker.check(part)}
    return time.perf_counter() - start, found


def shares_run(a: str, b: str, k: int = 6) -> bool:
    """Whether two texts share a run of ``k`` normalised words."""
    wa, wb = words(a), words(b)
    grams = {tuple(wa[i : i + k]) for i in range(len(wa) - k + 1)}
    return any(tuple(wb[i : i + k]) in grams for i in range(len(wb) - k + 1))


def main() -> None:
    """Measure and print recall, false positives and throughput."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--docs", type=int, default=200_000)
    parser.add_argument("--words", type=int, default=100, help="words per unrelated document")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="also time the check in this many processes")
    parser.add_argument("--ngram", type=int, default=Scheme().ngram)
    parser.add_argument("--threshold", type=float, default=Scheme().threshold)
    args = parser.parse_args()
    if args.quick:
        args.items, args.docs, args.repeats = 500, 20_000, 2
    rng = random.Random(2026)
    scheme = Scheme(args.ngram, args.threshold)

    t0 = time.perf_counter()
    pool = [p for p in paragraphs(stdlib_files()) if 12 <= len(p.split()) <= 120]
    items = rng.sample(pool, min(args.items, len(pool)))
    if DOC_ROOT.is_dir():
        source = f"{DOC_ROOT} (Debian package docs, *python* packages left out)"
        unrelated = list(debian_docs(args.words, args.docs))
    else:
        source = "standard-library docstrings not used as items"
        chosen = set(items)
        unrelated = documents([p for p in paragraphs(stdlib_files()) if p not in chosen], args.words)[: args.docs]
    print(f"text: items from stdlib docstrings ({len(pool)} paragraphs); unrelated documents from {source}")
    print(
        f"{len(items)} items, {len(unrelated)} unrelated documents of {args.words} words; ngram {scheme.ngram}, "
        f"threshold {scheme.threshold}, min shingles {scheme.min_shingles}; "
        f"loaded in {time.perf_counter() - t0:.1f} s; load {loadavg()}"
    )

    fp = fingerprint_items([(str(i), t) for i, t in enumerate(items)], scheme=scheme)
    sizes = [item.shingles.size for item in fp.items]
    stop_share = sum(all(w in STOP_WORDS for w in words(t)) for t in items) / len(items)
    print(
        f"fingerprint: {len(fp.items)} items ({fp.skipped} too short), shingles per item median "
        f"{statistics.median(sizes):.0f}, {len(json.dumps(fp.to_json())) / 1e3:.0f} kB as JSON "
        f"({stop_share:.1%} all stop words)"
    )

    # False positives on unrelated text.
    checker = Checker([("r", fp)])
    flagged: dict[str, str] = {}
    for part in batched(iter((f"u{i}", d) for i, d in enumerate(unrelated)), args.batch):
        for m in checker.check(part):
            flagged.setdefault(m.document, m.item)
    genuine = {d for d, item in flagged.items() if shares_run(items[int(item)], unrelated[int(d[1:])])}
    false_pos = len(flagged) - len(genuine)
    fp_rate = false_pos / len(unrelated)
    print(
        f"unrelated: {len(flagged)} flagged, {len(genuine)} of them quote the item (6-word run), "
        f"{false_pos} false positives = {fp_rate:.4%} (goal <= 0.1%)"
    )
    for d in sorted(set(flagged) - genuine)[:3]:
        print(f"  false positive {d}: item {items[int(flagged[d])][:80]!r} ~ doc {unrelated[int(d[1:])][:80]!r}")

    # Recall on lightly edited copies, inserted into unrelated documents.
    settings = [(0.05, None), (0.10, None), (0.10, ("swap", "delete")), (0.20, None)]
    recall: dict[str, float] = {}
    for rate, ops in settings:
        label = f"{rate:.0%} of words, {'swap/delete only' if ops else 'mixed edits'}"
        docs = [
            (fi.id, insert(light_edit(items[int(fi.id)], rng, rate, ops), rng.choice(unrelated), rng))
            for fi in fp.items
        ]
        found = {m.document for m in Checker([("r", fp)]).check(docs) if m.item == m.document}
        recall[label] = len(found) / len(docs)
        print(f"recall, {label}: {recall[label]:.4f}" + ("  (goal >= 0.99)" if rate == 0.10 and ops is None else ""))

    # Throughput: 1 % of documents contaminated, in batches.
    corpus = [(f"u{i}", d) for i, d in enumerate(unrelated)]
    for i, fi in enumerate(fp.items[: len(corpus) // 100]):
        corpus[i * 100] = (f"c{fi.id}", insert(light_edit(items[int(fi.id)], rng, 0.1), unrelated[i * 100], rng))
    mean_words = statistics.fmean(len(d.split()) for _, d in corpus[:10000])
    mean_bytes = statistics.fmean(len(d.encode()) for _, d in corpus[:10000])
    # Wall time, and CPU time of this process: on a shared machine the second is what the check costs.
    warm = Checker([("r", fp)])
    cold_rate, cold_cpu_rate, warm_rate, warm_cpu_rate = [], [], [], []
    for _ in range(args.repeats):
        cpu = time.process_time()
        cold_rate.append(len(corpus) / run_checker(fp, corpus, args.batch)[0])
        cold_cpu_rate.append(len(corpus) / (time.process_time() - cpu))
        start, cpu = time.perf_counter(), time.process_time()
        for part in batched(iter(corpus), args.batch):
            warm.check(part)
        warm_rate.append(len(corpus) / (time.perf_counter() - start))
        warm_cpu_rate.append(len(corpus) / (time.process_time() - cpu))
    print(
        f"check, {len(corpus)} documents (mean {mean_words:.0f} words, {mean_bytes:.0f} bytes), batches of "
        f"{args.batch}: cold {spread(cold_rate, '{:,.0f}')} docs/s ({spread(cold_cpu_rate, '{:,.0f}')} per "
        f"CPU-second), warm {spread(warm_rate, '{:,.0f}')} docs/s ({spread(warm_cpu_rate, '{:,.0f}')} per "
        f"CPU-second; goal >= 100,000); load {loadavg()}"
    )

    # Five registrations at once (the same shape of test set, other salts).
    many = [(f"r{k}", fingerprint_items([(str(i), t) for i, t in enumerate(items)], scheme=scheme)) for k in range(5)]
    five = Checker(many)
    for part in batched(iter(corpus), args.batch):
        five.check(part)
    start, cpu = time.perf_counter(), time.process_time()
    for part in batched(iter(corpus), args.batch):
        five.check(part)
    five_rate = len(corpus) / (time.perf_counter() - start)
    five_cpu = len(corpus) / (time.process_time() - cpu)
    print(f"check against 5 registrations, warm: {five_rate:,.0f} docs/s, {five_cpu:,.0f} per CPU-second")

    # End to end from a JSONL file: reading, JSON parsing, the corpus digest, the check.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "corpus.jsonl"
        with path.open("w") as out:
            for doc_id, text in corpus:
                out.write(json.dumps({"id": doc_id, "text": text}) + "\n")
        checker = Checker([("r", fp)])
        start, cpu = time.perf_counter(), time.process_time()
        for part in batched(Reader(path), args.batch):
            checker.check(part)
        file_rate = len(corpus) / (time.perf_counter() - start)
        file_cpu = len(corpus) / (time.process_time() - cpu)
    print(f"check from a JSONL file, cold, end to end: {file_rate:,.0f} docs/s, {file_cpu:,.0f} per CPU-second")

    if args.workers > 1:
        start = time.perf_counter()
        for _ in check_batches([("r", fp)], batched(iter(corpus), args.batch), args.workers):
            pass
        parallel = len(corpus) / (time.perf_counter() - start)
        print(f"check in {args.workers} worker processes, cold, wall clock: {parallel:,.0f} docs/s (load {loadavg()})")

    # Baseline: plain Python, interleaved with the vectorised check on the same documents.
    sample = corpus[: min(len(corpus), 20_000)]
    ratios, base_rates = [], []
    for _ in range(args.repeats):
        cpu = time.process_time()
        expected = reference_check(fp, sample)
        base = time.process_time() - cpu
        cpu = time.process_time()
        got = run_checker(fp, sample, args.batch)[1]
        fast = time.process_time() - cpu
        assert got == expected, f"vectorised and reference checks disagree on {len(got ^ expected)} pairs"
        ratios.append(base / fast)
        base_rates.append(len(sample) / base)
    print(
        f"baseline plain Python {spread(base_rates, '{:,.0f}')} docs per CPU-second; the vectorised check (cold) "
        f"is {spread(ratios, '{:.1f}')}x faster on the same {len(sample)} documents, with the same matches"
    )

    goal_recall = recall["10% of words, mixed edits"]
    report(
        "contamination",
        [
            {"figure": "recall, 10% words edited", "value": f"{goal_recall:.4f}", "goal": ">= 0.99"},
            {"figure": "false positives, unrelated docs", "value": f"{fp_rate:.4%}", "goal": "<= 0.1%"},
            {
                "figure": f"check docs per CPU-second ({mean_words:.0f} words), warm",
                "value": spread(warm_cpu_rate, "{:,.0f}"),
                "goal": ">= 100,000",
            },
        ],
    )


if __name__ == "__main__":
    main()
