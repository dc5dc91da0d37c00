"""The shared space on the command line: embed files, search a collection, compare inputs.

python eval/space.py embed  --checkpoint RUN --out clips.safetensors data/clips/     # audio
python eval/space.py embed  --out images.safetensors photos/                        # images
python eval/space.py embed  --checkpoint DEPTH_RUN --modality depth --out d.safetensors maps/
python eval/space.py search --checkpoint RUN --collection images.safetensors --query clip.wav -k 5
python eval/space.py search --checkpoint RUN --collection clips.safetensors --query "text:a dog"
python eval/space.py search --collection images.safetensors --checkpoint RUN \\
        --query img.png --plus clip.wav                     # embedding arithmetic
python eval/space.py compare --checkpoint RUN clip.wav "text:the digit seven"

Inputs: a file (modality from its extension: images -> vision, audio -> audio, .txt -> text),
MODALITY:PATH to name the modality (depth:frame.png), or text:WORDS. Images and text go through
the run's anchor; other modalities through the encoder of a --checkpoint trained on them.
"""

import argparse
import sys

from imagebind_lite.cli import TRUST_CODE_HELP, OneLineArgumentParser, device_arg, one_line_errors
from imagebind_lite.evaluation.space import (
    Space,
    SpaceError,
    combine,
    cosine,
    expand_paths,
    load_embeddings,
    modality_of,
    save_embeddings,
    search,
)


def embed(space: Space, args) -> None:
    paths = expand_paths(args.inputs, args.modality)
    texts = list(args.text or [])
    if not paths and not texts:
        raise SpaceError("nothing to embed: give files, folders or --text")
    modality = args.modality or ("text" if not paths else modality_of(paths[0]))
    if texts:
        if paths:
            raise SpaceError("embed files or --text, not both, into one collection")
        emb, items, errors = space.embed_texts(texts), texts, {}
    else:
        mixed = {modality_of(p) for p in paths} if not args.modality else {modality}
        if len(mixed) > 1:
            raise SpaceError(
                f"the inputs mix modalities ({', '.join(sorted(mixed))}): one "
                "collection holds one modality; name it with --modality"
            )
        emb, kept, errors = space.embed_files(
            paths, modality, args.batch_size, args.num_workers, not args.no_progress
        )
        items = [str(p) for p in kept]
    save_embeddings(
        args.out,
        emb,
        items,
        {
            "modality": modality,
            "fingerprint": space.fingerprint(modality),
            "runs": {m: str(p) for m, p in space.runs.items()},
        },
    )
    for path, error in list(errors.items())[:10]:
        print(f"skipped {path}: {error}", file=sys.stderr)
    print(
        f"embedded {len(items)} {modality} items ({len(errors)} skipped) -> {args.out} "
        f"(+ {args.out}.json)"
    )


def query_embedding(space: Space, args):
    q, _ = space.embed_input(args.query, args.query_modality)
    plus = [space.embed_input(p)[0] for p in args.plus or []]
    minus = [space.embed_input(m)[0] for m in args.minus or []]
    return combine([q, *plus], minus) if plus or minus else q


def add_common(parser, suffix: str = "") -> None:
    """--checkpoint and --device, before the command or after it (both forms are documented)."""
    parser.add_argument(
        "--checkpoint",
        dest="checkpoint" + suffix,
        action="append",
        default=[],
        help="a run folder (its anchor, and its encoder); repeatable",
    )
    parser.add_argument("--device", dest="device" + suffix, type=device_arg, default=None)
    parser.add_argument(
        "--trust-code", dest="trust_code" + suffix, action="store_true", help=TRUST_CODE_HELP
    )


def main(argv=None):
    parser = OneLineArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_common(parser)
    common = argparse.ArgumentParser(add_help=False)
    add_common(common, "_after")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "embed", parents=[common], help="files of one modality -> an embeddings file"
    )
    p.add_argument("inputs", nargs="*", help="files or folders")
    p.add_argument("--text", action="append", help="a text to embed (repeatable)")
    p.add_argument("--modality", help="vision, audio, depth, thermal, ... (default: extension)")
    p.add_argument(
        "--out", required=True, help="FILE.safetensors (+ FILE.safetensors.json listing the items)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("search", parents=[common], help="top-k of a collection for a query")
    p.add_argument("--collection", required=True, help="an embeddings file from `embed`")
    p.add_argument("--query", required=True, help="FILE, MODALITY:FILE or text:WORDS")
    p.add_argument("--query-modality", help="read the query file as this modality")
    p.add_argument("--plus", action="append", help="add this input's embedding (arithmetic)")
    p.add_argument("--minus", action="append", help="subtract this input's embedding")
    p.add_argument("-k", type=int, default=5)
    p = sub.add_parser("compare", parents=[common], help="cosine similarity of two inputs")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args(argv)
    checkpoints = args.checkpoint + args.checkpoint_after
    device = args.device_after or args.device or "cpu"
    with one_line_errors():
        space = Space.from_runs(
            checkpoints, device, trust_code=args.trust_code or args.trust_code_after
        )
        if args.command == "embed":
            return embed(space, args)
        if args.command == "search":
            collection, items, info = load_embeddings(args.collection)
            query = query_embedding(space, args)
            hits = search(query, collection, items, args.k)
            print(f"top {len(hits)} of {len(items)} {info.get('modality', '')} items:")
            for rank, (item, score) in enumerate(hits, 1):
                print(f"{rank:3d}  {score:+.4f}  {item}")
            return hits
        a, ma = space.embed_input(args.a)
        b, mb = space.embed_input(args.b)
        value = cosine(a, b)
        print(f"cosine({ma}, {mb}) = {value:+.4f}")
        return value


if __name__ == "__main__":
    main()
